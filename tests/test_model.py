"""The U-Net: layout, shapes, and loading it from lunaseg's and the book's checkpoints."""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from lunaseg.checkpoint import load_checkpoint
from lunaseg.config import ModelConfig, to_dict
from lunaseg.errors import CheckpointError, ConfigError
from lunaseg.inputs import SegmentationSpec
from lunaseg.model import (UNet, UNetWrapper, build_model, infer_model_config, load_model,
                           nodule_probability, save_model)

REFERENCE = Path(__file__).resolve().parent / "data"

BOOK_KEYS = {"sys_argv", "time", "model_state", "model_name", "optimizer_state",
             "optimizer_name", "epoch", "totalTrainingSamples_count"}


def _trained(seed: int = 0) -> tuple[UNetWrapper, torch.optim.Adam]:
    """A default model after one Adam step: BatchNorm stats and optimizer state are non-trivial."""
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 7, 16, 16) * 300
    model(x).mean().backward()
    optimizer.step()
    return model, optimizer


def _book_state_keys() -> set[str]:
    """The key set of the book's default model, written out by hand."""
    keys = {f"input_batchnorm.{n}" for n in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def block(prefix: str) -> set[str]:
        out = {f"{prefix}.block.{i}.{n}" for i in (0, 3) for n in ("weight", "bias")}
        return out | {f"{prefix}.block.{i}.{n}" for i in (2, 5) for n in bn}

    for level in range(3):
        keys |= block(f"unet.down_path.{level}")
    for level in range(2):
        keys |= {f"unet.up_path.{level}.up.weight", f"unet.up_path.{level}.up.bias"}
        keys |= block(f"unet.up_path.{level}.conv_block")
    return keys | {"unet.last.weight", "unet.last.bias"}


def test_default_parameter_count_is_the_books():
    model = build_model()
    assert sum(p.numel() for p in model.parameters()) == 118_271


def test_3_class_unet_shapes_and_parameter_count():
    model = build_model(ModelConfig(n_classes=3)).eval()
    # The last 1x1 conv maps 16 filters to 3 scores instead of 1: 2 x (16 weights + 1 bias).
    assert sum(p.numel() for p in model.parameters()) == 118_271 + 2 * 17 == 118_305
    assert model.state_dict().keys() == _book_state_keys()  # the book's names, 3 outputs
    assert model.state_dict()["unet.last.weight"].shape == (3, 16, 1, 1)
    x = torch.randn(2, 7, 48, 32) * 300
    with torch.no_grad():
        probs, logits = model(x), model(x, return_logits=True)
    assert probs.shape == logits.shape == (2, 3, 48, 32)
    torch.testing.assert_close(logits, model.logits(x))
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 48, 32))
    torch.testing.assert_close(nodule_probability(probs), 1 - probs[:, :1])
    one = build_model().eval()
    with torch.no_grad():
        assert one(x).shape == (2, 1, 48, 32)  # the 1-class model still ends in a sigmoid
        torch.testing.assert_close(nodule_probability(one(x)), one(x))
    assert infer_model_config(model.state_dict()) == ModelConfig(n_classes=3)


def test_state_dict_keys_match_book_layout():
    assert set(build_model().state_dict()) == _book_state_keys()


def test_conv_block_order_is_conv_relu_batchnorm():
    block = build_model().unet.down_path[0].block
    kinds = [type(m) for m in block]
    assert kinds == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.BatchNorm2d] * 2


def test_init_kaiming_fan_out_and_zero_bias():
    torch.manual_seed(0)
    conv = build_model().unet.down_path[2].block[3]  # 64 -> 64, fan_out = 64 * 9
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.all(conv.bias == 0)


@pytest.mark.parametrize("size", [(4, 4), (64, 64), (36, 100)])
def test_output_has_input_size(size):
    model = build_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 7, *size))
    assert out.shape == (2, 1, *size)
    assert torch.all((out >= 0) & (out <= 1))


def test_size_not_multiple_of_four_is_rejected():
    with pytest.raises(ValueError, match="multiples of 4"):
        build_model()(torch.randn(1, 7, 30, 32))


def test_upsample_mode_and_other_shapes():
    config = ModelConfig(in_channels=3, n_classes=3, depth=4, wf=3, up_mode="upsample",
                         batch_norm=False)
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 24, 40))
    assert out.shape == (1, 3, 24, 40)
    assert "unet.up_path.0.up.1.weight" in model.state_dict()
    assert infer_model_config(model.state_dict()) == config


def test_unpadded_unet_crops_skips():
    unet = UNet(in_channels=1, n_classes=1, depth=2, wf=2, padding=False, batch_norm=False)
    # 3x3 convs without padding: 28 -> 24 -> pool 12 -> 8 -> up 16 -> 12.
    assert unet(torch.randn(1, 1, 28, 28)).shape == (1, 1, 12, 12)


def test_channels_last_and_bf16_autocast():
    model = build_model().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 7, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.0)


@pytest.mark.parametrize("option,value", [("depth", 0), ("wf", -1), ("up_mode", "nearest"),
                                          ("in_channels", 0), ("n_classes", 2)])
def test_bad_model_options_raise_config_error(option, value):
    with pytest.raises(ConfigError, match=option):
        build_model(ModelConfig(**{option: value}))


# ---------------------------------------------------------------------------- checkpoints


def _save_book_checkpoint(path: Path, model, optimizer, fake_cuda: bool, monkeypatch) -> None:
    """Write a file the way the book's training script did (legacy pickle, its keys only)."""
    payload = {
        "sys_argv": ["training.py", "--epochs", "20", "--augmented"],
        "time": "2020-09-22 10:11:12.131415",
        "model_state": model.state_dict(),
        "model_name": type(model).__name__,
        "optimizer_state": optimizer.state_dict(),
        "optimizer_name": type(optimizer).__name__,
        "epoch": 10,
        "totalTrainingSamples_count": 3_000_000,
    }
    with monkeypatch.context() as patch:
        if fake_cuda:
            # No CUDA here: tag every storage as saved from GPU 0, as on the book's machine.
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("fake_cuda", [False, True])
def test_book_legacy_checkpoint_loads_strictly(tmp_path, monkeypatch, fake_cuda):
    model, optimizer = _trained()
    path = tmp_path / "seg_2020-09-22_10.11.12_final.10.state"
    _save_book_checkpoint(path, model, optimizer, fake_cuda, monkeypatch)
    data = path.read_bytes()
    assert not zipfile.is_zipfile(path)  # really the legacy format
    assert (b"cuda:0" in data) == fake_cuda

    loaded, checkpoint = load_model(path)
    assert checkpoint.format == "book"
    assert checkpoint.epoch == 10 and checkpoint.samples_seen == 3_000_000
    assert checkpoint.model_config is None and loaded.config == ModelConfig()  # inferred
    assert loaded.spec == SegmentationSpec(grouping="book", tta_rule="consensus")
    assert checkpoint.sha1 == hashlib.sha1(data).hexdigest()
    assert not loaded.training
    x = torch.randn(1, 7, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    fresh = torch.optim.Adam(loaded.parameters())
    fresh.load_state_dict(checkpoint.optimizer_state)


def test_book_checkpoint_with_cuda_storage_class(tmp_path, monkeypatch):
    """Older torch wrote ``torch.cuda.FloatStorage`` as the class; that must load too."""
    model, optimizer = _trained()
    path = tmp_path / "old.state"
    _save_book_checkpoint(path, model, optimizer, True, monkeypatch)
    data = path.read_bytes()
    data = re.sub(rb"ctorch\n(\w+Storage)\n", rb"ctorch.cuda\n\1\n", data)
    assert b"ctorch.cuda\nFloatStorage\n" in data
    path.write_bytes(data)
    loaded, _ = load_model(path)
    torch.testing.assert_close(loaded.state_dict()["unet.last.weight"],
                               model.state_dict()["unet.last.weight"])


def test_round_trip_restores_identical_outputs(tmp_path):
    model, optimizer = _trained()
    config = {"batch_size": 16, "data": {"chunk_irc": (7, 96, 96)}, "out": Path("runs/x")}
    path = tmp_path / "ckpt" / "model.pt"
    sha1 = save_model(path, model, optimizer=optimizer, config=config, epoch=3,
                      samples_seen=1234, extra={"best_recall": 0.8})
    assert sha1 == hashlib.sha1(path.read_bytes()).hexdigest()
    assert os.listdir(path.parent) == ["model.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)
    assert BOOK_KEYS <= set(raw)
    assert raw["format"] == "lunaseg-1" and raw["totalTrainingSamples_count"] == 1234

    loaded, checkpoint = load_model(path)
    assert checkpoint.format == "lunaseg-1" and checkpoint.sha1 == sha1
    assert checkpoint.epoch == 3 and checkpoint.samples_seen == 1234
    assert checkpoint.config["out"] == "runs/x"
    assert checkpoint.config["data"]["chunk_irc"] == (7, 96, 96)
    assert checkpoint.extra == {"best_recall": 0.8}
    x = torch.randn(2, 7, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    torch.optim.Adam(loaded.parameters()).load_state_dict(checkpoint.optimizer_state)


def test_model_config_and_spec_are_stored_not_guessed(tmp_path):
    config = ModelConfig(in_channels=5, depth=2, wf=3, padding=False)
    spec = SegmentationSpec(min_hu=-1200.0, max_hu=600.0, context_slices=2, size_multiple=2,
                            tta=4)
    path = tmp_path / "m.pt"
    save_model(path, build_model(config, spec), config=None, epoch=0, samples_seen=0)
    assert load_checkpoint(path).model_config == to_dict(config)  # padding=False survives
    loaded, _ = load_model(path)
    assert loaded.config == config and loaded.spec == spec


def test_a_spec_that_does_not_fit_the_model_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, build_model(spec=SegmentationSpec(context_slices=2)), config=None,
               epoch=0, samples_seen=0)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model(path)


def test_classifier_checkpoint_is_not_taken_for_a_unet(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model_state": build_model().state_dict(), "model_kind": "classifier",
                "format": "lunaseg-1"}, path)
    with pytest.raises(CheckpointError, match="classifier model, not a segmentation U-Net"):
        load_model(path)


def test_not_a_unet_is_named(tmp_path):
    path = tmp_path / "notunet.pt"
    torch.save({"model_state": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="U-Net"):
        load_model(path)


def test_the_books_real_checkpoint_loads_with_the_books_spec():
    model, checkpoint = load_model(shared_path("models", "book-seg-2020-01-26.best.state"))
    assert checkpoint.format == "book" and checkpoint.epoch == 5
    assert model.config == ModelConfig()
    assert model.spec == SegmentationSpec(grouping="book", tta_rule="consensus")


def test_3_class_checkpoint_round_trips(tmp_path):
    torch.manual_seed(2)
    model = build_model(ModelConfig(n_classes=3)).eval()
    save_model(tmp_path / "m.pt", model, epoch=1, samples_seen=1)
    loaded, checkpoint = load_model(tmp_path / "m.pt")
    assert loaded.n_classes == 3 and checkpoint.model_config["n_classes"] == 3
    x = torch.randn(1, 7, 32, 32) * 300
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_1_class_checkpoint_of_the_last_release_gives_the_same_output():
    """A 1-class checkpoint written by lunaseg before 3-class models (commit 2e7d298, see
    data/make_reference_outputs.py) loads as it did and gives what that code gave."""
    reference = np.load(REFERENCE / "one_class_reference.npz")
    model, checkpoint = load_model(REFERENCE / "one_class_checkpoint.pt")
    assert model.n_classes == 1 and model.config == ModelConfig(depth=2, wf=2)
    assert checkpoint.model_config.get("n_classes") == 1
    x = torch.from_numpy(reference["hu"]).float()
    with torch.no_grad():
        logits, output = model.logits(x).numpy(), model(x).numpy()
    np.testing.assert_allclose(logits, reference["small_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(output, reference["small_output"], rtol=1e-5, atol=1e-6)


def test_the_books_checkpoint_gives_the_same_output_as_before():
    reference = np.load(REFERENCE / "one_class_reference.npz")
    model, _ = load_model(shared_path("models", "book-seg-2020-01-26.best.state"))
    assert model.n_classes == 1
    x = torch.from_numpy(reference["hu"]).float()
    with torch.no_grad():
        logits, output = model.logits(x).numpy(), model(x).numpy()
    # Its logits reach +-80: compared relative to that scale (float32 kernels differ by CPU:
    # an AMX machine put one logit of -17.2 off by 3e-4).
    scale = np.abs(reference["book_logits"]).max()
    np.testing.assert_allclose(logits, reference["book_logits"], rtol=1e-5, atol=1e-5 * scale)
    # The sigmoid's slope is at most 1/4, so its output moves at most a quarter as much.
    np.testing.assert_allclose(output, reference["book_output"], rtol=1e-5,
                               atol=0.25 * 1e-5 * scale)


def test_dataparallel_prefix_is_stripped(tmp_path):
    state = {f"module.{k}": v for k, v in build_model().state_dict().items()}
    path = tmp_path / "dp.pt"
    torch.save({"model_state": state, "epoch": 1}, path)
    loaded, checkpoint = load_model(path)
    assert checkpoint.samples_seen is None and checkpoint.epoch == 1


def test_mismatched_weights_raise_checkpoint_error(tmp_path):
    state = build_model().state_dict()
    del state["unet.last.bias"]
    path = tmp_path / "partial.pt"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_model(path)
    assert "\n" not in str(info.value)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_and_checkpoint_to_cpu(tmp_path):
    model = build_model().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 7, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().mean().backward()
    optimizer.step()
    assert out.shape == (4, 1, 64, 64)
    path = tmp_path / "gpu.pt"
    save_model(path, model, optimizer=optimizer, config=None, epoch=1, samples_seen=4)
    loaded, checkpoint = load_model(path)  # CPU
    assert next(loaded.parameters()).device.type == "cpu"
    assert checkpoint.optimizer_state["state"][0]["exp_avg"].device.type == "cpu"
