"""Classifier training: it separates nodules from vessels, logs the book's tags, resumes
exactly, keeps the segmentation run's splits, and fine-tunes only the chosen layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DenseStandIn, spheres_and_tubes
from lunaseg import layout
from lunaseg.cache import Cache, median_pixel_mm, prepcache
from lunaseg.checkpoint import load_checkpoint
from lunaseg.classifier import load_classifier
from lunaseg.cli import main
from lunaseg.config import (CacheConfig, ClassifierConfig, ClassifierDataConfig,
                            ClassifierTrainConfig, CropAugmentConfig)
from lunaseg.errors import ConfigError
from lunaseg.train_classifier import classifier_samples, classifier_splits, train_classifier

TINY = ClassifierConfig(conv_channels=4, depth=2, crop_irc=(8, 16, 16))
TAGS = ("loss/all", "loss/pos", "loss/neg", "correct/all", "correct/pos", "correct/neg",
        "pr/precision", "pr/recall", "pr/f1_score", "auc")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core runner a waiting second thread slows every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 series of spheres (nodules) and tubes (vessels); every 4th series validates."""
    root = spheres_and_tubes(tmp_path_factory.mktemp("st"), series=16)
    summary = prepcache(root, root / "cache", config=CacheConfig(workers=1, chunk_irc=(7, 32, 32)),
                        progress=False)
    assert not summary.failed
    return root


def _config(**changes) -> ClassifierTrainConfig:
    data = ClassifierDataConfig(val_stride=4, epoch_samples=changes.pop("epoch_samples", 128))
    # The tiny net takes a rate ten times the full-size default (1e-4) and learns in seconds.
    return ClassifierTrainConfig(**{"model": TINY, "data": data, "epochs": 2, "batch_size": 16,
                                    "lr": 1e-3, "device": "cpu", **changes})


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model_state


def test_short_training_tells_nodules_from_vessels(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train_classifier(_config(epochs=8, epoch_samples=256), data_dir / "cache", out,
                              data_dir=data_dir, seg_model=DenseStandIn(), progress=False)
    assert result.epochs_done == 8 and result.best is not None
    # 4 validation series: about 10 spheres against 16 tubes and the stand-in's blobs.
    last = result.history[-1]["val"]
    assert result.best["auc"] >= 0.9 and last["auc"] >= 0.85
    assert last["samples"] > 26  # the segmentation negatives are in it
    model, checkpoint = load_classifier(result.best_checkpoint)
    assert model.spec.crop_irc == (8, 16, 16) and checkpoint.model_kind == "classifier"
    train_uids = json.loads((out / layout.SPLITS_FILE).read_text())["train"]
    assert model.spec.pixel_mm == median_pixel_mm(Cache(data_dir / "cache"), train_uids) > 0
    assert (out / layout.SEGMENTATION_CANDIDATES_FILE).exists()
    metrics = json.loads((out / layout.METRICS_FILE).read_text())
    assert metrics["best"]["epoch"] == result.best["epoch"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for split in ("trn", "val"):
        events = EventAccumulator(str(result.tb_dir / split))
        events.Reload()
        assert set(TAGS) <= set(events.Tags()["scalars"])
        steps = [event.step for event in events.Scalars("auc")]
        assert steps == sorted(steps) and steps[-1] == result.samples_seen


def test_resume_repeats_the_uninterrupted_run_exactly(data_dir, tmp_path):
    changes = dict(augment=CropAugmentConfig(), seed=5, epochs=3)
    whole = train_classifier(_config(**changes), data_dir / "cache", tmp_path / "a",
                             progress=False)
    # Killed after 2 of 3 epochs (8 steps each).
    half = train_classifier(_config(**changes), data_dir / "cache", tmp_path / "b",
                            max_steps=16, progress=False)
    assert half.epochs_done == 2
    resumed = train_classifier(ClassifierTrainConfig(device="cpu"), data_dir / "cache",
                               tmp_path / "b", resume=tmp_path / "b" / layout.LAST_CHECKPOINT,
                               progress=False)
    assert resumed.epochs_done == 3 and resumed.samples_seen == whole.samples_seen
    a, b = _state(whole.checkpoint), _state(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val"]["auc"] for h in resumed.history] == [h["val"]["auc"] for h in whole.history]
    assert load_checkpoint(resumed.checkpoint).spec == load_checkpoint(whole.checkpoint).spec
    other = train_classifier(_config(**{**changes, "seed": 6, "epochs": 1}), data_dir / "cache",
                             tmp_path / "c", progress=False)
    assert any(not torch.equal(v, _state(other.checkpoint)[k])
               for k, v in _state(half.checkpoint).items())


def test_the_segmentation_runs_splits_are_kept(data_dir, tmp_path):
    cache = Cache(data_dir / "cache")
    uids = cache.series_uids
    seg_run = tmp_path / "seg"
    seg_run.mkdir()
    splits = {"train": uids[2:], "val": uids[:2], "test": []}
    (seg_run / layout.SPLITS_FILE).write_text(json.dumps(splits))
    config = _config()
    found = classifier_splits(cache, tmp_path / "cls", config, [("segmentation run", seg_run)])
    assert found == splits
    samples = classifier_samples(config, cache, found, tmp_path / "cls", data_dir=data_dir)
    train_series = {s.series_uid for s in samples.train_positives + samples.train_negatives}
    assert train_series <= set(uids[2:])
    assert {s.series_uid for s in samples.val} == set(uids[:2])
    result = train_classifier(_config(epochs=1), data_dir / "cache", tmp_path / "cls",
                              seg_run=seg_run, max_steps=1, progress=False)
    assert json.loads((result.out_dir / layout.SPLITS_FILE).read_text()) == splits


@pytest.mark.parametrize("depth, trained", [(1, {"head_linear"}),
                                            (2, {"head_linear", "block2"})])
def test_malignancy_fine_tunes_only_the_chosen_layers(data_dir, tmp_path, depth, trained):
    nodule = train_classifier(_config(epochs=1), data_dir / "cache", tmp_path / "nodule",
                              progress=False)
    result = train_classifier(_config(task="malignancy", finetune_depth=depth, epochs=2,
                                      epoch_samples=64),
                              data_dir / "cache", tmp_path / "malignancy",
                              init_from=nodule.checkpoint, progress=False)
    before, after = _state(nodule.checkpoint), _state(result.checkpoint)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        layer = key.split(".")[0]
        assert changed == (layer in trained and not key.endswith("num_batches_tracked")), key
    model, _ = load_classifier(result.checkpoint)
    assert model.config.classes == ("benign", "malignant")
    # Held-out nodules of both kinds were scored.
    val = result.history[-1]["val"]
    assert val["count/tp"] + val["count/fn"] > 0 and val["count/tn"] + val["count/fp"] > 0
    assert val["auc"] is not None
    # The nodule run's splits were reused.
    assert (json.loads((tmp_path / "malignancy" / layout.SPLITS_FILE).read_text())
            == json.loads((tmp_path / "nodule" / layout.SPLITS_FILE).read_text()))


def test_malignancy_needs_a_nodule_classifier(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--from"):
        train_classifier(_config(task="malignancy"), data_dir / "cache", tmp_path / "m",
                         progress=False)


def test_cli_trains_a_classifier(data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(["-q", "train-classifier", "--data", str(data_dir), "--out", str(out),
                   "--epochs", "1", "--epoch-samples", "32", "--batch-size", "16",
                   "--crop", "8,16,16", "--conv-channels", "4", "--depth", "2",
                   "--val-stride", "4", "--no-aug-rotate", "--device", "cpu"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "best validation (epoch 1): AUC" in printed and str(out) in printed
    saved = json.loads((out / layout.RUN_CONFIG_FILE).read_text())
    assert saved["augment"]["rotate"] is False and saved["model"]["crop_irc"] == [8, 16, 16]
