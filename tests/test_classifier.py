"""The candidate classifier: the book's architecture, its file, lunaseg's files, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from lunaseg.classifier import (NoduleClassifier, build_classifier, finetune_layers,
                                infer_classifier_config, load_classifier, save_classifier)
from lunaseg.config import ClassifierConfig
from lunaseg.errors import CheckpointError, ConfigError
from lunaseg.inputs import ClassifierSpec
from lunaseg.model import build_model, load_model, save_model

BOOK_KEYS = (["tail_batchnorm.weight", "tail_batchnorm.bias", "tail_batchnorm.running_mean",
              "tail_batchnorm.running_var", "tail_batchnorm.num_batches_tracked"]
             + [f"block{b}.conv{c}.{p}" for b in range(1, 5) for c in (1, 2)
                for p in ("weight", "bias")]
             + ["head_linear.weight", "head_linear.bias"])


def _book_file():
    return shared_path("models", "book-cls-2020-02-06.best.state")


def _hand_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The book's LunaModel written out with functional calls on the raw state dict."""
    out = F.batch_norm(x, state["tail_batchnorm.running_mean"],
                       state["tail_batchnorm.running_var"], state["tail_batchnorm.weight"],
                       state["tail_batchnorm.bias"], training=False, eps=1e-5)
    for block in range(1, 5):
        for conv in (1, 2):
            out = F.relu(F.conv3d(out, state[f"block{block}.conv{conv}.weight"],
                                  state[f"block{block}.conv{conv}.bias"], padding=1))
        out = F.max_pool3d(out, 2, 2)
    logits = F.linear(out.reshape(out.shape[0], -1), state["head_linear.weight"],
                      state["head_linear.bias"])
    return torch.softmax(logits, dim=1)


def _crops(n: int = 3) -> torch.Tensor:
    """Lung at -800 HU with noise; crop 1 holds a 40 HU ball of radius 6 (an obvious nodule),
    crop 2 a 40 HU tube along the rows (a vessel)."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, 32, 48, 48), -800.0) + 20 * torch.randn(n, 1, 32, 48, 48, generator=g)
    i, r, c = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), torch.arange(48.0),
                             indexing="ij")
    ball = ((i - 16) * 2.5) ** 2 + ((r - 24) * 0.7) ** 2 + ((c - 24) * 0.7) ** 2 <= 6.0 ** 2
    x[1, 0][ball] = 40.0
    tube = ((i - 16) * 2.5) ** 2 + ((c - 24) * 0.7) ** 2 <= 1.5 ** 2
    x[2, 0][tube] = 40.0
    return x.clamp(-1000, 1000)


def test_book_architecture_has_its_parameter_count_names_and_output():
    model = build_classifier()
    assert sum(p.numel() for p in model.parameters()) == 222_220
    assert list(model.state_dict()) == BOOK_KEYS
    assert model.head_linear.in_features == 64 * 2 * 3 * 3
    logits = model(torch.zeros(2, 1, 32, 48, 48))
    assert logits.shape == (2, 2)
    probs = model.probabilities(torch.zeros(2, 1, 32, 48, 48))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert model.spec == ClassifierSpec(crop_irc=(32, 48, 48))
    with pytest.raises(ValueError, match="32, 48, 48"):
        model(torch.zeros(1, 1, 32, 48, 40))


@pytest.mark.parametrize("crop_irc, depth, width, flat", [
    ((16, 32, 64), 4, 8, 64 * 1 * 2 * 4), ((8, 16, 16), 2, 4, 8 * 2 * 4 * 4),
    ((32, 48, 48), 3, 16, 64 * 4 * 6 * 6)])
def test_flatten_size_follows_the_crop(crop_irc, depth, width, flat):
    config = ClassifierConfig(conv_channels=width, depth=depth, crop_irc=crop_irc)
    model = build_classifier(config)
    assert model.head_linear.in_features == flat
    assert model(torch.zeros(2, 1, *crop_irc)).shape == (2, 2)
    if crop_irc == (32, 48, 48):
        assert infer_classifier_config(model.state_dict()) == config
    else:  # a file without settings is only read with the book's crop
        with pytest.raises(CheckpointError, match="does not say its crop"):
            infer_classifier_config(model.state_dict())


@pytest.mark.parametrize("crop_irc", [(30, 48, 48), (32, 48), (8, 48, 48)])
def test_crop_must_be_multiples_of_the_pooling(crop_irc):
    with pytest.raises(ConfigError, match="crop_irc"):
        build_classifier(ClassifierConfig(crop_irc=crop_irc))


def test_initialisation_is_the_books():
    torch.manual_seed(0)
    model = build_classifier()
    conv = model.block4.conv2
    fan_out = 64 * 27
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    # normal_(bias, -b, b): mean -b, standard deviation b, b = 1/sqrt(fan_out).
    biases = torch.cat([b.conv1.bias for b in model.blocks] + [b.conv2.bias for b in model.blocks])
    assert biases.mean().item() < 0
    head = model.head_linear
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 2), rel=0.05)


def test_book_checkpoint_loads_strictly_and_matches_a_hand_built_forward():
    model, checkpoint = load_classifier(_book_file())
    assert checkpoint.format == "book" and checkpoint.epoch == 90
    assert isinstance(model, NoduleClassifier) and not model.training
    assert model.config == ClassifierConfig() and model.spec == ClassifierSpec()
    x = _crops()
    with torch.no_grad():
        probs = model.probabilities(x)
    torch.testing.assert_close(probs, _hand_forward(checkpoint.model_state, x), rtol=1e-4,
                               atol=1e-5)
    # softmax over (non-nodule, nodule): plain lung and a vessel are not nodules, a ball is.
    assert probs[0, 1] < 0.5 and probs[2, 1] < 0.5 and probs[1, 1] > 0.5


def test_save_and_load_round_trip(tmp_path):
    spec = ClassifierSpec(min_hu=-900.0, max_hu=500.0, crop_irc=(16, 16, 16))
    model = build_classifier(ClassifierConfig(conv_channels=4, depth=3, crop_irc=(16, 16, 16),
                                              classes=("benign", "malignant")), spec)
    path = tmp_path / "cls.pt"
    save_classifier(path, model, epoch=3, samples_seen=96)
    loaded, checkpoint = load_classifier(path)
    assert checkpoint.model_kind == "classifier" and checkpoint.epoch == 3
    assert loaded.config == model.config and loaded.spec == spec
    x = torch.randn(2, 1, 16, 16, 16) * 300
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_unet_and_classifier_files_refuse_each_other(tmp_path):
    unet_path, cls_path = tmp_path / "unet.pt", tmp_path / "cls.pt"
    save_model(unet_path, build_model(), epoch=0, samples_seen=0)
    save_classifier(cls_path, build_classifier(), epoch=0, samples_seen=0)
    with pytest.raises(CheckpointError, match=r"unet\.pt: holds a segmentation model, not a "
                                              r"classifier$"):
        load_classifier(unet_path)
    with pytest.raises(CheckpointError, match="holds a classifier model, not a segmentation"):
        load_model(cls_path)
    # A bare book-style U-Net state (no model_kind) is named for what it is.
    torch.save({"model_state": build_model().state_dict()}, tmp_path / "book-unet.state")
    with pytest.raises(CheckpointError, match="segmentation U-Net, not a classifier"):
        load_classifier(tmp_path / "book-unet.state")


def test_book_files_refuse_the_other_loader():
    with pytest.raises(CheckpointError, match="segmentation U-Net, not a classifier"):
        load_classifier(shared_path("models", "book-seg-2020-01-26.best.state"))
    with pytest.raises(CheckpointError, match="U-Net"):
        load_model(_book_file())


def test_finetune_layers_count_from_the_output():
    model = build_classifier()
    assert finetune_layers(model, 1) == ["head_linear"]
    assert finetune_layers(model, 2) == ["block4", "head_linear"]
    with pytest.raises(ConfigError, match="finetune_depth"):
        finetune_layers(model, 6)


def test_a_head_fine_tuned_copy_shares_the_trunk_and_runs_with_it_once():
    from lunaseg.classifier import SharedTrunk, shares_trunk
    from lunaseg.train_classifier import prepare_finetune

    torch.manual_seed(0)
    nodule = build_classifier().eval()
    malignancy = build_classifier().eval()
    assert not shares_trunk(nodule, malignancy)  # drawn apart
    malignancy.load_state_dict(nodule.state_dict())
    prepare_finetune(malignancy, 1)  # a fresh head, the trunk frozen
    assert shares_trunk(nodule, malignancy)
    x = torch.randn(3, 1, 32, 48, 48) * 300
    with torch.no_grad():
        both = SharedTrunk(nodule, malignancy)(x)
        torch.testing.assert_close(both, torch.cat([nodule(x), malignancy(x)], dim=1),
                                   rtol=0, atol=0)
        assert not torch.equal(both[:, :2], both[:, 2:])
        # One changed weight in the trunk (or a different BatchNorm state) and it is not.
        malignancy.block4.conv2.weight[0, 0, 0, 0, 0] += 1e-3
    assert not shares_trunk(nodule, malignancy)
    assert not shares_trunk(nodule, torch.nn.Linear(2, 2))
