"""The training loop: it learns, checkpoints round-trip, resumes exactly, logs, runs DDP."""

from __future__ import annotations

import io
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lunaseg.train
from conftest import add_sphere, class_luna, malignancy_rows, tiny_volume
from lunaseg.cache import Cache, prepcache
from lunaseg.checkpoint import load_checkpoint
from lunaseg.config import (AugmentConfig, CacheConfig, DataConfig, ModelConfig, SegmentConfig,
                            TrainConfig)
from lunaseg.ct import CT, write_image
from lunaseg.datasets import TrainingSampler, split_series
from lunaseg.errors import ConfigError, DataError
from lunaseg.files import write_csv
from lunaseg.geometry import Geometry
from lunaseg.inputs import SegmentationSpec
from lunaseg.luna import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, MALIGNANCY_COLUMNS
from lunaseg.metrics import pixel_counts
from lunaseg.model import UNetWrapper, build_model, load_model
from lunaseg.predict import predict_classes
from lunaseg.roc import roc_auc
from lunaseg.segment import segment_ct
from lunaseg.train import (BEST_CHECKPOINT, LAST_CHECKPOINT, TrainResult, _is_better, _set_lr,
                           check_train_config, train)

CHUNK = (7, 48, 48)
SCALAR_TAGS = ("loss/all", "percent_all/tp", "percent_all/fn", "percent_all/fp",
               "pr/precision", "pr/recall", "pr/f1_score")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train on one thread: on a shared 2-core runner, a second OpenMP thread that has to wait
    for a busy core makes every step several times slower (the numbers are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Four phantom series (the first validates), six nodules of 3.5-6 px radius, 48-px chunks."""
    return _make_cache(tmp_path_factory.mktemp("luna"))


def _make_cache(root: Path, shape: tuple[int, int, int] = (16, 64, 64), *,
                malignancy: bool = True) -> Path:
    rng = np.random.default_rng(21)
    geometry = Geometry.identity(spacing_xyz=(0.8, 0.8, 2.0))
    nodules = [[(8, 30, 30, 5.0)], [(5, 26, 24, 4.0), (11, 38, 36, 6.0)],
               [(8, 34, 26, 3.5)], [(6, 28, 36, 5.0), (11, 36, 26, 4.5)]]
    # The 5-6 px ones are malignant, so the three training series hold both classes.
    malignant = [radius >= 5.0 for series_nodules in nodules for *_, radius in series_nodules]
    annotations, candidates = [], []
    for k, series_nodules in enumerate(nodules):
        uid = f"1.2.840.77.{k + 1}"
        hu = tiny_volume(rng, shape)
        for i, r, c, radius in series_nodules:
            add_sphere(hu, (i, r, c), (2, radius, radius))
            xyz = geometry.irc_to_xyz(np.array([i, r, c], float))
            annotations.append([uid, *xyz.round(4), 1.6 * radius])
            candidates.append([uid, *xyz.round(4), 1])
        candidates.append([uid, *geometry.irc_to_xyz(np.array([8.0, 20, 44])).round(4), 0])
        write_image(hu, geometry, root / "subset0" / f"{uid}.mhd")
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    if malignancy:
        write_csv(root / "annotations_with_malignancy.csv", MALIGNANCY_COLUMNS,
                  malignancy_rows(annotations, malignant))
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)
    summary = prepcache(root, root / "cache", config=CacheConfig(workers=1, chunk_irc=CHUNK),
                        progress=False)
    assert not summary.failed
    return root / "cache"


def _config(*, epochs: int, batch_size: int = 8, epoch_samples: int = 32,
            **changes) -> TrainConfig:
    data = DataConfig(crop_px=32, val_stride=4, epoch_samples=epoch_samples,
                      negative_crop_fraction=changes.pop("negative_crop_fraction", 0.0),
                      full_slice_fraction=changes.pop("full_slice_fraction", 0.0),
                      hard_negative_fraction=changes.pop("hard_negative_fraction", 0.0),
                      hard_negative_slices=8)
    return TrainConfig(data=data, epochs=epochs, batch_size=batch_size, device="cpu",
                       validation_cadence=changes.pop("validation_cadence", 100), **changes)


def _capture_models(monkeypatch: pytest.MonkeyPatch) -> list[UNetWrapper]:
    """Record every model train() builds, so a test can look at the in-memory weights."""
    built: list[UNetWrapper] = []

    def recording_build_model(config, spec=None):
        built.append(build_model(config, spec))
        return built[-1]

    monkeypatch.setattr(lunaseg.train, "build_model", recording_build_model)
    return built


def _recall_precision(model: torch.nn.Module, input: torch.Tensor, label: torch.Tensor
                      ) -> tuple[float, float]:
    model.eval()
    with torch.inference_mode():
        tp, fn, fp = pixel_counts(model(input), label).sum(dim=0).tolist()
    return tp / (tp + fn), tp / max(tp + fp, 1)


def _fixed_training_crops(cache_dir: Path, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training chunk cut at five fixed offsets (centre and corners)."""
    cache = Cache(cache_dir)
    sampler = TrainingSampler(cache, split_series(cache.series_uids, data)["train"], data,
                              torch.device("cpu"), SegmentationSpec())
    bank = sampler.positives
    inputs, labels = [], []
    for row, col in ((8, 8), (0, 0), (0, 16), (16, 0), (16, 16)):
        hu = bank.hu[:, :, row:row + 32, col:col + 32]
        inputs.append(sampler._to_input(hu))
        labels.append(bank.label[:, None, row:row + 32, col:col + 32])
    return torch.cat(inputs), torch.cat(labels)


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
def test_short_run_learns_its_training_crops(cache_dir, tmp_path, monkeypatch, amp):
    # bf16 autocast runs where the CPU has bf16 units (else it is float32 again).
    config = _config(epochs=6, batch_size=16, epoch_samples=128, amp=amp)
    input, label = _fixed_training_crops(cache_dir, config.data)
    assert input.shape == (25, 7, 32, 32) and label.sum() > 0
    built = _capture_models(monkeypatch)
    # train() seeds torch with config.seed before building the model: the same fresh weights.
    torch.manual_seed(config.seed)
    start, _ = _recall_precision(build_model(config.model), input, label)
    result = train(config, cache_dir, tmp_path / "run", progress=False)
    assert result.epochs_done == 6 and not result.interrupted
    end, precision = _recall_precision(built[0], input, label)
    trained, _ = load_model(result.checkpoint)
    assert _recall_precision(trained, input, label) == (end, precision)
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert start < end and end >= 0.8, (start, end)
    # Not just "everything is nodule": twice the precision of marking every pixel.
    assert precision > 2 * label.float().mean().item(), precision
    losses = [record["train"]["loss/all"] for record in result.history]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def logged_run(cache_dir, tmp_path_factory) -> tuple[TrainResult, UNetWrapper, TrainConfig]:
    """Two epochs, validated (with images) after both; the in-memory model is kept."""
    config = _config(epochs=2, validation_cadence=2)
    out = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as monkeypatch:
        built = _capture_models(monkeypatch)
        result = train(config, cache_dir, out, progress=False)
    return result, built[0], config


def test_checkpoint_round_trip_and_run_files(logged_run, cache_dir):
    result, model, config = logged_run
    out = result.out_dir
    assert result.checkpoint == out / LAST_CHECKPOINT and result.checkpoint.is_file()
    assert result.best_checkpoint == out / BEST_CHECKPOINT and result.best_checkpoint.is_file()
    loaded, checkpoint = load_model(result.checkpoint)
    assert checkpoint.epoch == 2 and checkpoint.samples_seen == result.samples_seen == 64
    assert checkpoint.format == "lunaseg-1" and checkpoint.optimizer_state is not None
    state = model.state_dict()
    assert state.keys() == loaded.state_dict().keys()
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in state.items())
    model.eval()
    input = torch.from_numpy(np.clip(Cache(cache_dir)[
        Cache(cache_dir).series_uids[1]].context_stack(8, 3), -1000, 1000).astype(np.float32))
    with torch.inference_mode():
        # Same weights; the trained model is channels_last, the loaded one is not, so the
        # convolutions may sum in another order: equal to float rounding, not bit for bit.
        torch.testing.assert_close(model(input[None]), loaded(input[None]), rtol=1e-4,
                                   atol=1e-6)
    best = load_checkpoint(result.best_checkpoint)
    assert best.epoch == result.best["epoch"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [1, 2]
    assert all("val" in record for record in metrics["history"])
    assert metrics["best"]["epoch"] in (1, 2) and "pr/recall" in metrics["best"]
    splits = json.loads((out / "splits.json").read_text())
    assert splits == split_series(Cache(cache_dir).series_uids, config.data)
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["data"]["crop_px"] == 32
    assert list((out / "overlays").glob("epoch002_val_00_slice*.png"))


def test_tensorboard_scalars_and_images(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = logged_run
    steps = [record["samples_seen"] for record in result.history]
    assert steps == [32, 64]
    series = {"trn": len(json.loads((result.out_dir / "splits.json").read_text())["train"]),
              "val": 1}
    for split in ("trn", "val"):
        events = EventAccumulator(str(result.tb_dir / split),
                                  size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        tags = events.Tags()
        for tag in SCALAR_TAGS:
            assert tag in tags["scalars"], (split, tag)
            assert [event.step for event in events.Scalars(tag)] == steps
        recall = [event.value for event in events.Scalars("pr/recall")]
        key = "train" if split == "trn" else "val"
        np.testing.assert_allclose(recall, [r[key]["pr/recall"] for r in result.history],
                                   atol=1e-5)
        for k in range(series[split]):
            for j in range(6):
                predictions = events.Images(f"{split}/{k}_prediction_{j}")
                assert [event.step for event in predictions] == steps
                labels = events.Images(f"{split}/{k}_label_{j}")
                assert [event.step for event in labels] == steps[:1]  # the label only once
                assert predictions[0].width == labels[0].width > 0
        assert f"{split}/{series[split]}_prediction_0" not in tags["images"]
        # The PNG copy on disk is the image TensorBoard shows, and it decodes to an RGB slice.
        shown = events.Images(f"{split}/0_prediction_0")[-1]
        copies = sorted((result.out_dir / "overlays").glob(f"epoch002_{split}_00_slice*.png"))
        rgb = np.asarray(Image.open(io.BytesIO(shown.encoded_image_string)))
        assert rgb.shape == (shown.height, shown.width, 3) and rgb.std() > 0
        assert len(copies) == 6
        # The PNG copy is that image with a strip beneath it naming the colours.
        with Image.open(copies[0]) as image:
            copy = np.asarray(image)
        np.testing.assert_array_equal(copy[:rgb.shape[0], :rgb.shape[1]], rgb)
        assert copy.shape[0] == rgb.shape[0] + 14


# ----------------------------------------------------------------------------- resume


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model_state


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run_exactly(cache_dir, tmp_path):
    # Everything that draws random numbers or depends on the epoch: augmentation, negative
    # and whole-slice mixing, hard negatives mined with the current model, the cosine rate.
    changes = dict(augment=AugmentConfig.book(), negative_crop_fraction=0.25,
                   full_slice_fraction=0.25, hard_negative_fraction=0.5, lr_schedule="cosine",
                   seed=3)
    whole = train(_config(epochs=4, **changes), cache_dir, tmp_path / "a", progress=False)
    # A run of 4 epochs killed after 2 (4 steps per epoch).
    half = train(_config(epochs=4, **changes), cache_dir, tmp_path / "b", max_steps=8,
                 progress=False)
    assert half.epochs_done == 2
    resumed = train(_config(epochs=4), cache_dir, tmp_path / "b",
                    resume=tmp_path / "b" / LAST_CHECKPOINT, progress=False)
    assert resumed.epochs_done == 4 and resumed.samples_seen == whole.samples_seen
    a, b = _state(whole.checkpoint), _state(resumed.checkpoint)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different
    # The resumed run kept the checkpoint's settings, not the bare config it was given.
    assert json.loads((tmp_path / "b" / "config.json").read_text())["seed"] == 3
    optimizer_a = load_checkpoint(whole.checkpoint).optimizer_state["state"]
    optimizer_b = load_checkpoint(resumed.checkpoint).optimizer_state["state"]
    assert all(torch.equal(optimizer_a[p]["exp_avg_sq"], optimizer_b[p]["exp_avg_sq"])
               for p in optimizer_a)
    # Different seeds really train differently (the equality above is not vacuous).
    other = train(_config(epochs=1, seed=4), cache_dir, tmp_path / "c", progress=False)
    first = train(_config(epochs=1, seed=3), cache_dir, tmp_path / "d", progress=False)
    assert any(not torch.equal(value, _state(other.checkpoint)[key])
               for key, value in _state(first.checkpoint).items())


def test_deeper_unet_pads_whole_slices_to_its_multiple(tmp_path):
    # Depth 4 halves three times, so whole slices (training, hard negatives, validation,
    # images) must be padded to multiples of 8; these 60x60 slices are not.
    cache_dir = _make_cache(tmp_path / "luna", shape=(16, 60, 60))
    assert all(Cache(cache_dir)[uid].hu.shape[1:] == (60, 60)
               for uid in Cache(cache_dir).series_uids)
    config = _config(epochs=2, full_slice_fraction=0.5, negative_crop_fraction=0.25,
                     hard_negative_fraction=0.5, validation_cadence=1,
                     model=ModelConfig(depth=4))
    result = train(config, cache_dir, tmp_path / "run", progress=False)
    assert result.epochs_done == 2 and all("val" in record for record in result.history)
    config.data.crop_px = 36
    with pytest.raises(ConfigError, match="crop_px 36 must be a multiple of 8"):
        train(config, cache_dir, tmp_path / "bad", progress=False)


def test_keyboard_interrupt_keeps_the_epoch_checkpoint_and_resumes_exactly(
        cache_dir, tmp_path, monkeypatch):
    original = TrainingSampler.batches
    fetched = [0]

    def interrupted(self, epoch, batch_size):
        for batch in original(self, epoch, batch_size):
            if fetched[0] == 6:  # epoch 1 has 4 steps: Ctrl-C in the middle of epoch 2
                raise KeyboardInterrupt
            fetched[0] += 1
            yield batch

    changes = dict(augment=AugmentConfig.book(), negative_crop_fraction=0.25,
                   hard_negative_fraction=0.5, lr_schedule="cosine")
    monkeypatch.setattr(TrainingSampler, "batches", interrupted)
    out = tmp_path / "run"
    result = train(_config(epochs=3, **changes), cache_dir, out, progress=False)
    assert result.interrupted and result.epochs_done == 1
    checkpoint = load_checkpoint(out / LAST_CHECKPOINT)
    assert checkpoint.epoch == 1  # the clean end of epoch 1, not mid-epoch weights
    assert checkpoint.samples_seen == result.samples_seen == 4 * 8
    assert [record["epoch"] for record in checkpoint.extra["history"]] == [1]

    monkeypatch.setattr(TrainingSampler, "batches", original)
    resumed = train(_config(epochs=3), cache_dir, out, resume=out / LAST_CHECKPOINT,
                    progress=False)
    assert not resumed.interrupted and resumed.epochs_done == 3
    assert [record["epoch"] for record in resumed.history] == [1, 2, 3]
    assert resumed.samples_seen == 3 * 4 * 8
    whole = train(_config(epochs=3, **changes), cache_dir, tmp_path / "whole", progress=False)
    a, b = _state(whole.checkpoint), _state(resumed.checkpoint)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_killed_save_leaves_the_checkpoints_whole_and_its_orphan_is_cleaned(
        cache_dir, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    train(_config(epochs=1), cache_dir, out, progress=False)
    best = (out / BEST_CHECKPOINT).read_bytes()
    # A save killed while it writes: the temporary file stays, the real files do not change.
    script = ("import sys, time\n"
              "from lunaseg.files import write_atomic\n"
              "def slow(handle):\n"
              "    handle.write(b'partial')\n"
              "    handle.flush()\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n"
              f"write_atomic({str(out / BEST_CHECKPOINT)!r}, slow)\n")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        assert child.stdout.readline().strip() == b"writing"
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out / BEST_CHECKPOINT).read_bytes() == best
    assert len(list(out.glob(".*.tmp"))) == 1
    train(_config(epochs=2), cache_dir, out, resume=out / LAST_CHECKPOINT, progress=False)
    assert not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- bad settings


# (setting, value, what the message must name): each makes a run crash deep inside, loop
# without end or silently do something else when it is not refused up front.
BAD_SETTINGS = [
    ("epochs", 0, "epochs"),
    ("batch_size", 0, "batch_size"),
    ("batch_size", -2, "batch_size"),
    ("validation_cadence", 0, "validation_cadence"),
    ("num_workers", -1, "num_workers"),
    ("lr", 0.0, "lr"),
    ("lr", -1e-3, "lr"),
    ("lr", math.nan, "lr"),
    ("lr", math.inf, "lr"),
    ("lr_schedule", "step", "lr_schedule"),
    ("lr_final_fraction", -0.1, "lr_final_fraction"),
    ("lr_final_fraction", 1.5, "lr_final_fraction"),
    ("fn_weight", -1.0, "fn_weight"),
    ("bce_weight", -0.5, "bce_weight"),
    ("best_min_recall", 1.5, "best_min_recall"),
    ("best_min_recall", -0.1, "best_min_recall"),
    ("data.crop_px", 0, "crop_px"),
    ("data.crop_px", 34, "crop_px"),  # not a multiple of 4
    ("data.epoch_samples", -1, "epoch_samples"),
    ("data.full_slice_fraction", 1.5, "full_slice_fraction"),
    ("data.full_slice_fraction", -0.1, "full_slice_fraction"),
    ("data.negative_crop_fraction", 1.0, "negative_crop_fraction"),
    ("data.negative_crop_fraction", -0.1, "negative_crop_fraction"),
    ("data.hard_negative_fraction", 0.5, "hard_negative_fraction"),  # no negatives to re-cut
    ("data.hard_negative_fraction", 1.5, "hard_negative_fraction"),
    ("data.val_stride", 1, "val_stride"),
    ("data.min_hu", 1000.0, "min_hu < max_hu"),
    ("data.context_slices", 4, "context_slices"),  # 9 channels for a 7-channel model
    ("model.in_channels", 9, "in_channels"),
    ("model.n_classes", 2, "n_classes"),
    ("class_weight", -1.0, "class_weight"),
]


@pytest.mark.parametrize("setting, value, named", BAD_SETTINGS,
                         ids=[f"{s}={v}" for s, v, _ in BAD_SETTINGS])
def test_bad_settings_fail_before_the_run_folder_exists(cache_dir, tmp_path, setting, value,
                                                        named):
    config = _config(epochs=1)
    *parents, name = setting.split(".")
    target = config
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=named) as error:
        train(config, cache_dir, out, progress=False)
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_a_cache_too_small_for_the_crop_fails_before_the_run_folder_exists(cache_dir, tmp_path):
    config = _config(epochs=1)
    config.data.crop_px = 64  # the cache holds 48-px chunks
    with pytest.raises(DataError, match="prepcache with --chunk 7,64,64"):
        train(config, cache_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


class _InputRecorder(torch.nn.Module):
    """Wraps a model and records the smallest and largest input value it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec = model.spec
        self.low, self.high = float("inf"), float("-inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.low, self.high = min(self.low, x.min().item()), max(self.high, x.max().item())
        return self.model(x)


def test_3_classes_without_malignancy_labels_fail_before_the_run_folder_exists(tmp_path):
    cache_dir = _make_cache(tmp_path / "luna", malignancy=False)  # annotations.csv alone
    config = _config(epochs=1, model=ModelConfig(n_classes=3))
    with pytest.raises(DataError, match="0 malignant .*annotations_with_malignancy.csv"):
        train(config, cache_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_non_default_hu_window_reaches_inference(cache_dir, tmp_path):
    config = _config(epochs=1, epoch_samples=16)
    config.data.min_hu, config.data.max_hu = -600.0, 250.0
    result = train(config, cache_dir, tmp_path / "run", progress=False)
    model, checkpoint = load_model(result.checkpoint)
    # The spec also carries the training scans' pixels, which segment brings other scans to.
    splits = json.loads((result.out_dir / "splits.json").read_text())
    pixels = [float(np.mean(Cache(cache_dir)[uid].geometry.spacing_xyz[:2]))
              for uid in splits["train"]]
    assert model.spec.pixel_mm == pytest.approx(float(np.median(pixels)), abs=1e-4)
    assert model.spec == SegmentationSpec(min_hu=-600.0, max_hu=250.0,
                                          pixel_mm=model.spec.pixel_mm)
    assert checkpoint.spec["min_hu"] == -600.0
    hu = np.full((9, 40, 40), -1000, dtype=np.int16)
    hu[:, 10:30, 10:30] = 900  # far outside the window on both sides
    recorder = _InputRecorder(model)
    segment_ct(recorder, CT(hu, Geometry.identity(), "s"), SegmentConfig(lung_mask=False),
               device="cpu")
    assert (recorder.low, recorder.high) == (-600.0, 250.0)


def test_default_and_test_settings_pass_the_check():
    check_train_config(TrainConfig())
    check_train_config(_config(epochs=1, negative_crop_fraction=0.25, hard_negative_fraction=1.0,
                               full_slice_fraction=1.0, best_min_recall=0.0, lr_final_fraction=1.0))


def test_resume_with_bad_epochs_leaves_the_run_untouched(cache_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(epochs=1), cache_dir, out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match="epochs"):
        train(_config(epochs=0), cache_dir, out, resume=out / LAST_CHECKPOINT, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cache_dir: Path, root: Path,
                config: TrainConfig) -> None:
    """One DDP rank: train, then leave its weights and what it saw in ``root``."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        built = _capture_models(monkeypatch)
        result = train(config, cache_dir, root / f"out{rank}", progress=False)
    torch.save(built[0].state_dict(), root / f"state{rank}.pt")
    summary = {"samples_seen": result.samples_seen, "epochs_done": result.epochs_done,
               "group_left_open": dist.is_initialized(),
               "train_samples": [r["train"]["samples"] for r in result.history]}
    (root / f"result{rank}.json").write_text(json.dumps(summary))


@pytest.mark.slow
@pytest.mark.parametrize("classes", [1, 3])
def test_ddp_on_cpu_two_ranks(cache_dir, tmp_path, classes):
    import torch.multiprocessing as mp

    config = _config(epochs=2, batch_size=4, epoch_samples=32,
                     model=ModelConfig(n_classes=classes))
    mp.spawn(_ddp_worker, args=(2, _free_port(), cache_dir, tmp_path, config), nprocs=2,
             join=True)
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)]
    states = [torch.load(tmp_path / f"state{rank}.pt", weights_only=True) for rank in (0, 1)]
    # (i) one model: parameters and BatchNorm buffers agree on both ranks.
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())
    saved = load_checkpoint(tmp_path / "out0" / LAST_CHECKPOINT).model_state
    assert all(torch.equal(value, saved[key]) for key, value in states[0].items())
    # (ii) rank 0 alone writes files.
    assert not (tmp_path / "out1").exists()
    written = {p.name for p in (tmp_path / "out0").iterdir()}
    assert {LAST_CHECKPOINT, BEST_CHECKPOINT, "metrics.json", "splits.json",
            "config.json", "tensorboard"} <= written
    # (iii) samples seen count both ranks: 32 per epoch = 4 steps x 4 samples x 2 ranks.
    for result in results:
        assert result["samples_seen"] == 64 and result["epochs_done"] == 2
        assert result["train_samples"] == [32, 32]
        assert not result["group_left_open"]
    # (iv) the class metrics, summed over ranks, come with a 3-class model only.
    history = json.loads((tmp_path / "out0" / "metrics.json").read_text())["history"]
    assert ("pr_malignant/recall" in history[-1]["val"]) == (classes == 3)
    assert load_checkpoint(tmp_path / "out0" / LAST_CHECKPOINT).model_config["n_classes"] \
        == classes


def test_best_checkpoint_rule():
    low_recall = {"pr/recall": 0.85, "pr/f1_score": 0.30}
    high_recall = {"pr/recall": 0.97, "pr/f1_score": 0.02}
    good = {"pr/recall": 0.92, "pr/f1_score": 0.10}
    # The book's rule: recall first.
    assert _is_better(high_recall, good) and not _is_better(good, high_recall)
    # With a recall floor, F1 decides among validations above it; below it never wins.
    assert _is_better(good, high_recall, 0.9) and not _is_better(high_recall, good, 0.9)
    assert not _is_better(low_recall, good, 0.9)
    assert _is_better({"pr/recall": 0.97, "pr/f1_score": 0.03}, high_recall)


def test_a_tie_in_sensitivity_goes_to_the_higher_cpm_though_the_best_is_stored_rounded():
    from lunaseg.train import _rounded

    sensitivity = 27 / 33  # 0.8181818..., stored as 0.818182
    best = _rounded({"cand/sensitivity_at_budget": sensitivity, "cand/cpm": 0.511})
    later = {"cand/sensitivity_at_budget": sensitivity, "cand/cpm": 0.563}
    assert _is_better(later, best, by="candidates")
    assert not _is_better({**later, "cand/cpm": 0.5}, best, by="candidates")


def test_cosine_learning_rate_by_hand():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    config = TrainConfig(lr=0.01, lr_schedule="cosine", lr_final_fraction=0.1)

    def lr_at(progress: float) -> float:
        _set_lr(optimizer, config, progress)
        return optimizer.param_groups[0]["lr"]

    # From lr down to lr * 0.1 along half a cosine; halfway is the mean of the two.
    assert [lr_at(0.0), lr_at(0.5), lr_at(1.0)] == pytest.approx([0.01, 0.0055, 0.001])
    assert lr_at(0.25) == pytest.approx(0.001 + 0.009 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(2.0) == pytest.approx(0.001)  # past the end (resumed with fewer epochs)
    config.lr_schedule = "constant"
    assert lr_at(0.7) == 0.01


# ----------------------------------------------------------------------------- 3 classes


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory) -> Path:
    """Twelve scans, each with a dense benign and a soft malignant nodule (conftest)."""
    root = class_luna(tmp_path_factory.mktemp("classes"))
    summary = prepcache(root, root / "cache", config=CacheConfig(workers=1, chunk_irc=(7, 40, 40)),
                        progress=False)
    assert not summary.failed
    return root / "cache"


def _held_out_malignancy(model: UNetWrapper, cache: Cache, uids: list[str]
                         ) -> tuple[list[float], list[bool]]:
    """Each held-out nodule's mean p(malignant | nodule) over its labelled voxels, and its
    class."""
    scores, labels = [], []
    for uid in uids:
        entry = cache[uid]
        _, malignancy = predict_classes(model, np.asarray(entry.hu), model.spec,
                                        crop_to_body=False)
        classes = entry.classes()
        for value in (1, 2):
            scores.append(float((1 / (1 + np.exp(-malignancy[classes == value]))).mean()))
            labels.append(value == 2)
    return scores, labels


@pytest.mark.slow
def test_a_short_3_class_run_tells_the_classes_apart_on_held_out_nodules(class_cache, tmp_path):
    config = _config(epochs=8, batch_size=16, epoch_samples=128, negative_crop_fraction=0.25,
                     model=ModelConfig(n_classes=3))
    config.data.val_stride = 3
    result = train(config, class_cache, tmp_path / "run", progress=False)
    assert result.epochs_done == 8
    model, checkpoint = load_model(result.checkpoint)
    assert model.n_classes == 3 and checkpoint.model_config["n_classes"] == 3
    cache = Cache(class_cache)
    held_out = split_series(cache.series_uids, config.data)["val"]
    scores, labels = _held_out_malignancy(model, cache, held_out)
    assert len(scores) == 8 and sum(labels) == 4
    # Chance is 0.5; the nodules differ only in what they are made of.
    auc = roc_auc(labels, scores)
    assert auc >= 0.9, (auc, scores)
    last = result.history[-1]
    assert last["val"]["pr/recall"] > 0.5  # the union is still segmented
    assert "pr_malignant/recall" in last["train"] and "confusion/accuracy" in last["val"]
