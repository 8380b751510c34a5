"""Training the candidate classifier (nodule or not) and fine-tuning it for malignancy.

Balanced crops come from the prepcache (:mod:`lunaseg.classifier_data`), are augmented per
sample on the training device (:class:`lunaseg.augment.CropAugmentation`) and scored with
cross-entropy.  Each epoch logs the book's classification tags plus ROC AUC to TensorBoard
(``trn`` / ``val``) and ``metrics.json``, writes ``checkpoint.pt`` atomically (with the
model's input spec, optimizer and RNG states) and copies it to ``checkpoint.best.pt`` when
the validation AUC is the best so far.  A resumed run repeats exactly what an uninterrupted
one would have done.  Splits are the segmentation run's, so the classifier never trains on
a series the U-Net validated on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lunaseg import layout
from lunaseg.augment import CropAugmentation
from lunaseg.cache import Cache, median_pixel_mm
from lunaseg.checkpoint import Checkpoint, load_checkpoint
from lunaseg.classifier import (NoduleClassifier, build_classifier, check_classifier_config,
                                finetune_layers, init_layer, load_classifier, save_classifier)
from lunaseg.classifier_data import (CropSample, CropSampler, avoided_findings,
                                     check_classifier_data_config, cut_samples,
                                     lookalike_samples, nodule_samples,
                                     segmentation_candidates, segmentation_negatives)
from lunaseg.classifier_metrics import ClassifierMetrics
from lunaseg.classify import crops_to_input
from lunaseg.config import (CLASSIFIER_TASKS, ClassifierTrainConfig, DataConfig,
                            SegmentConfig, check_at_least, from_dict, to_dict)
from lunaseg.datasets import load_splits, split_series
from lunaseg.errors import CheckpointError, ConfigError, DataError
from lunaseg.files import copy_atomic, write_json_atomic
from lunaseg.inputs import ClassifierSpec
from lunaseg.progress import bar as progress_bar
from lunaseg.runtime import (autocast, capture_rng_state, crop_batch, resolve_device,
                             restore_rng_state)
from lunaseg.train import TrainResult

__all__ = ["ClassifierTrainResult", "ClassifierSamples", "train_classifier",
           "check_classifier_train_config", "classifier_splits", "classifier_samples",
           "evaluate_classifier", "prepare_finetune", "MALIGNANCY_CLASSES"]

log = logging.getLogger(__name__)

MALIGNANCY_CLASSES = ("benign", "malignant")


@dataclass
class ClassifierTrainResult(TrainResult):
    """Where a classifier run left its outputs and how its validations went (the fields
    of a U-Net run's)."""


@dataclass
class ClassifierSamples:
    """Training and validation samples of a run, positives and negatives apart."""

    train_positives: list[CropSample]
    train_negatives: list[CropSample]
    val: list[CropSample]

    def counts(self) -> str:
        def by_source(samples: Sequence[CropSample]) -> str:
            sources: dict[str, int] = {}
            for s in samples:
                sources[s.source] = sources.get(s.source, 0) + 1
            return ", ".join(f"{n} {name}" for name, n in sorted(sources.items())) or "none"

        val_pos = [s for s in self.val if s.label]
        val_neg = [s for s in self.val if not s.label]
        return (f"train: {len(self.train_positives)} positive ({by_source(self.train_positives)})"
                f", {len(self.train_negatives)} negative ({by_source(self.train_negatives)}); "
                f"val: {len(val_pos)} positive, {len(val_neg)} negative ({by_source(val_neg)})")


def check_classifier_train_config(config: ClassifierTrainConfig) -> None:
    """ConfigError for settings that cannot train; called before anything is written."""
    for name in ("epochs", "batch_size", "validation_cadence"):
        check_at_least(config, name, 1)
    if config.task not in CLASSIFIER_TASKS:
        raise ConfigError(f"task must be one of {', '.join(CLASSIFIER_TASKS)}, got "
                          f"{config.task!r}")
    if config.optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {config.lr}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    check_classifier_config(config.model)
    check_classifier_data_config(config.data)
    finetune_layers(build_classifier(config.model), config.finetune_depth)
    CropAugmentation(config.augment, config.model.crop_irc, seed=0)  # checks the options


# ----------------------------------------------------------------------------- data


def classifier_splits(cache: Cache, out_dir: Path, config: ClassifierTrainConfig,
                      sources: Sequence[tuple[str, Path | None]] = ()) -> dict[str, list[str]]:
    """The run's series splits: its own (a resumed run), else the first run folder of
    ``sources`` ((what, folder) pairs: the segmentation run, the classifier fine-tuned from)
    that has a splits file, else a new split with the run's strides."""
    data = DataConfig(val_stride=config.data.val_stride, test_stride=config.data.test_stride)
    own = out_dir / layout.SPLITS_FILE
    if own.exists():
        return load_splits(own, cache.series_uids, data)
    for what, folder in sources:
        if folder is None or not (folder / layout.SPLITS_FILE).exists():
            continue
        splits = load_splits(folder / layout.SPLITS_FILE, cache.series_uids, data)
        unlisted = sorted(set(cache.series_uids) - set(sum(splits.values(), [])))
        if unlisted:
            log.warning("%d cached series are in no split of %s (first: %s); the classifier "
                        "leaves them out", len(unlisted), folder, unlisted[0])
        log.info("using the splits of the %s (%s)", what, folder / layout.SPLITS_FILE)
        return splits
    return split_series(cache.series_uids, data)


def classifier_samples(config: ClassifierTrainConfig, cache: Cache,
                       splits: dict[str, list[str]], out_dir: Path, *,
                       data_dir: str | os.PathLike | None = None,
                       seg_model: nn.Module | str | os.PathLike | None = None,
                       device: torch.device | None = None,
                       progress: bool = True) -> ClassifierSamples:
    """The run's samples: nodules against look-alikes and segmentation candidates far from
    any finding ("nodule"), or malignant against benign nodules ("malignancy")."""
    train_uids, val_uids = list(splits["train"]), list(splits["val"])
    if config.task == "malignancy":
        train = nodule_samples(cache, train_uids, "malignancy")
        val = nodule_samples(cache, val_uids, "malignancy")
        return ClassifierSamples([s for s in train if s.label],
                                 [s for s in train if not s.label], val)
    negatives: list[CropSample] = []
    if config.data.lookalikes:
        negatives += lookalike_samples(cache, train_uids + val_uids)
    if seg_model is not None and config.data.segmentation_negatives > 0:
        uids = train_uids + val_uids
        found = segmentation_candidates(seg_model, cache, uids,
                                        out_dir / layout.SEGMENTATION_CANDIDATES_FILE,
                                        # bf16 where the run trains in it, as validation
                                        segment=SegmentConfig(tta=config.data.segmentation_tta,
                                                              amp=config.amp, overlays=0,
                                                              write_volumes=False),
                                        device=device, progress=progress)
        negatives += segmentation_negatives(found, avoided_findings(cache, uids, data_dir),
                                            config.data)
    train_set = set(train_uids)
    return ClassifierSamples(
        nodule_samples(cache, train_uids),
        [s for s in negatives if s.series_uid in train_set],
        nodule_samples(cache, val_uids) + [s for s in negatives if s.series_uid not in train_set])


# ----------------------------------------------------------------------------- model


def prepare_finetune(model: NoduleClassifier, depth: int) -> list[str]:
    """Freeze all but the last ``depth`` layers (1 = the head, 2 = head + last block) and
    draw the head afresh (its classes change); returns the trained layers' names.

    Frozen layers stay in eval mode while training (:func:`_set_train_mode`), so not even
    the input BatchNorm's running statistics move.
    """
    trained = finetune_layers(model, depth)
    for name, module in model.named_children():
        for parameter in module.parameters():
            parameter.requires_grad_(name in trained)
    init_layer(model.head_linear)
    return trained


def _set_train_mode(model: NoduleClassifier, trained: Sequence[str] | None) -> None:
    model.train()
    if trained is not None:
        for name, module in model.named_children():
            if name not in trained:
                module.eval()


def _build_model(config: ClassifierTrainConfig, init_from: str | os.PathLike | None,
                 checkpoint: Checkpoint | None) -> tuple[NoduleClassifier, ClassifierTrainConfig]:
    """A new model (nodule task), the nodule classifier ``init_from`` with a new head
    (malignancy), or the resumed run's own (weights loaded by the caller)."""
    if config.task == "nodule":
        spec = ClassifierSpec(min_hu=config.data.min_hu, max_hu=config.data.max_hu,
                              crop_irc=tuple(config.model.crop_irc))
        return build_classifier(config.model, spec), config
    if checkpoint is not None:  # a resumed malignancy run: the saved config has it all
        spec = ClassifierSpec.from_dict(checkpoint.spec) if checkpoint.spec else None
        return build_classifier(config.model, spec), config
    if init_from is None:
        raise ConfigError("task malignancy fine-tunes a nodule classifier: give --from CKPT")
    source, _ = load_classifier(init_from)
    model_config = replace(source.config, classes=MALIGNANCY_CLASSES)
    model = build_classifier(model_config, source.spec)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head_linear.")}
    model.load_state_dict(state, strict=False)
    return model, replace(config, model=model_config)


def _optimizer(model: nn.Module, config: ClassifierTrainConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(parameters, lr=config.lr)


# ----------------------------------------------------------------------------- loops


def evaluate_classifier(model: NoduleClassifier, entries: dict, samples: Sequence[CropSample],
                        *, batch_size: int = 0, device: torch.device | None = None,
                        amp: bool = False, progress: bool = False) -> ClassifierMetrics:
    """Cross-entropy and p(positive) of ``model`` on un-augmented crops of ``samples``."""
    device = device or next(model.parameters()).device
    step = crop_batch(device, batch_size)
    metrics = ClassifierMetrics()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in progress_bar(range(0, len(samples), step), enabled=progress,
                                      desc="validate", unit="batch", leave=False):
                part = samples[start:start + step]
                crops = torch.from_numpy(cut_samples(entries, part, model.spec.crop_irc))
                label = torch.tensor([s.label for s in part], device=device)
                input = crops_to_input(crops.to(device), model.spec)
                with autocast(device, amp):
                    logits = model(input).float()
                loss = F.cross_entropy(logits, label.long(), reduction="none")
                metrics.update(loss, label, torch.softmax(logits, dim=1)[:, -1])
    finally:
        model.train(was_training)
    return metrics


def _train_epoch(model: NoduleClassifier, optimizer: torch.optim.Optimizer,
                 sampler: CropSampler, augment: CropAugmentation,
                 config: ClassifierTrainConfig, device: torch.device, epoch: int,
                 trained: Sequence[str] | None, step_budget: int | None,
                 progress: bool) -> tuple[ClassifierMetrics, int, float]:
    """One epoch of optimizer steps; returns (metrics, steps taken, seconds)."""
    _set_train_mode(model, trained)
    metrics = ClassifierMetrics()
    started = time.perf_counter()
    steps, seen = 0, 0
    bar = progress_bar(sampler.batches(epoch, config.batch_size),
                       total=sampler.steps_per_epoch(config.batch_size), enabled=progress,
                       desc=f"epoch {epoch}/{config.epochs}", unit="step")
    for crops, labels, _ in bar:
        hu = torch.from_numpy(crops).to(device, non_blocking=True)
        label = torch.from_numpy(labels).to(device, non_blocking=True)
        input, _ = augment(crops_to_input(hu, model.spec))
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, config.amp):
            logits = model(input).float()
        loss = F.cross_entropy(logits, label.long(), reduction="none")
        loss.mean().backward()
        optimizer.step()
        metrics.update(loss, label, torch.softmax(logits.detach(), dim=1)[:, -1])
        steps += 1
        seen += len(labels)
        rate = seen / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{rate:.0f} samples/s", refresh=False)
        if step_budget is not None and steps >= step_budget:
            break
    bar.close()
    return metrics, steps, time.perf_counter() - started


class _Writers:
    """One TensorBoard writer per split (``trn``, ``val``), as the book has."""

    def __init__(self, tb_dir: Path) -> None:
        self.tb_dir = tb_dir
        self._writers: dict = {}

    def scalars(self, split: str, values: dict, samples_seen: int) -> None:
        if split not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[split] = SummaryWriter(log_dir=str(self.tb_dir / split))
        writer = self._writers[split]
        for tag, value in values.items():
            if ("/" in tag or tag == "auc") and not tag.startswith("count/") \
                    and math.isfinite(value):
                writer.add_scalar(tag, value, samples_seen)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def _resume_config(saved: dict, requested: ClassifierTrainConfig) -> ClassifierTrainConfig:
    """The resumed run's own settings, with the requested device, and its epochs when they
    differ from the default (so a larger number extends the run)."""
    try:
        run = from_dict(ClassifierTrainConfig, saved)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"the run's saved settings are not this lunaseg's: {error}") \
            from None
    default = ClassifierTrainConfig()
    epochs = requested.epochs if requested.epochs != default.epochs else run.epochs
    return replace(run, device=requested.device, epochs=epochs)


def _rounded(metrics: dict) -> dict:
    """Metrics for JSON: floats rounded, NaN (a class without samples) as None."""
    return {k: ((round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v)
            for k, v in metrics.items()}


def _line(split: str, m: dict) -> str:
    def fmt(key: str, spec: str) -> str:
        return "n/a" if m.get(key) is None else format(m[key], spec)

    return (f"{split} loss {fmt('loss/all', '.4f')} correct {fmt('correct/all', '.1f')}% "
            f"(pos {fmt('correct/pos', '.1f')}%, neg {fmt('correct/neg', '.1f')}%) "
            f"AUC {fmt('auc', '.3f')}")


def train_classifier(config: ClassifierTrainConfig, cache_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                     seg_model: nn.Module | str | os.PathLike | None = None,
                     seg_run: str | os.PathLike | None = None,
                     init_from: str | os.PathLike | None = None,
                     resume: str | os.PathLike | None = None,
                     tb_dir: str | os.PathLike | None = None, max_steps: int | None = None,
                     progress: bool = True) -> ClassifierTrainResult:
    """Train a classifier on the cached dataset; see the module docstring for the outputs.

    ``seg_model``: a U-Net (checkpoint or module) whose candidates far from nodules become
    negatives; ``seg_run``: the folder whose splits.json to use (default: the seg model's
    folder, when it has one).  ``init_from``: the nodule classifier a malignancy run
    fine-tunes.  ``data_dir``: the dataset, for its excluded findings.  ``resume``: a
    checkpoint of this kind of run, continued with its own settings.  ``max_steps`` stops
    after that many optimizer steps in all.
    """
    check_classifier_train_config(config)
    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    tb_dir = Path(tb_dir) if tb_dir is not None else out_dir / layout.TENSORBOARD_DIR
    cache = Cache(cache_dir)
    start_epoch, samples_seen, best, history = 1, 0, None, []
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        if checkpoint.model_kind != "classifier" or checkpoint.config is None:
            raise CheckpointError(f"{resume}: not a lunaseg classifier training checkpoint")
        config = _resume_config(checkpoint.config, config)
        check_classifier_train_config(config)
        extra = checkpoint.extra or {}
        start_epoch = int(checkpoint.epoch or 0) + 1
        samples_seen = int(checkpoint.samples_seen or 0)
        best, history = extra.get("best"), list(extra.get("history", []))
        init_from = extra.get("init_from")
    torch.manual_seed(config.seed)
    model, config = _build_model(config, init_from, checkpoint)
    trained = prepare_finetune(model, config.finetune_depth) if config.task == "malignancy" \
        else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
    model.to(device)
    optimizer = _optimizer(model, config)
    if checkpoint is not None:
        if checkpoint.optimizer_state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        if checkpoint.rng_state:
            restore_rng_state(checkpoint.rng_state)
        log.info("resuming from %s at epoch %d (%d samples seen)", resume, start_epoch,
                 samples_seen)

    seg_model_dir = Path(seg_model).parent if isinstance(seg_model, (str, os.PathLike)) \
        else None
    sources = [("segmentation run", Path(seg_run) if seg_run is not None else None),
               ("nodule classifier run", Path(init_from).parent if init_from else None),
               ("segmentation model's run", seg_model_dir)]
    if seg_run is not None and not (Path(seg_run) / layout.SPLITS_FILE).exists():
        raise DataError(f"{Path(seg_run) / layout.SPLITS_FILE}: no splits file; is {seg_run} a "
                        f"lunaseg train run folder?")
    splits = classifier_splits(cache, out_dir, config, sources)
    if not splits["train"]:
        raise DataError(f"{cache.folder}: no series left for training after the split")
    if config.task == "nodule":  # the scale its crops teach (a resumed run: the same splits)
        model.spec = replace(model.spec, pixel_mm=median_pixel_mm(cache, splits["train"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(splits, out_dir / layout.SPLITS_FILE)
    write_json_atomic(to_dict(config), out_dir / layout.RUN_CONFIG_FILE)
    samples = classifier_samples(config, cache, splits, out_dir, data_dir=data_dir,
                                 seg_model=seg_model, device=device, progress=progress)
    augment = CropAugmentation(config.augment, model.spec.crop_irc, seed=config.seed)
    sampler = CropSampler(cache, samples.train_positives, samples.train_negatives, config.data,
                          augment.source_irc, seed=config.seed)
    val_entries = {uid: cache[uid] for uid in sorted({s.series_uid for s in samples.val})}
    log.info("training a %s classifier on %s: %d train / %d val series; %s; %d steps of %d "
             "per epoch, source crops %s", config.task, device, len(splits["train"]),
             len(splits["val"]), samples.counts(), sampler.steps_per_epoch(config.batch_size),
             config.batch_size, "x".join(map(str, augment.source_irc)))
    if config.task == "malignancy":
        log.info("fine-tuning %s; the other layers stay frozen", ", ".join(trained or []))

    writers = _Writers(tb_dir)
    result = ClassifierTrainResult(out_dir, tb_dir, out_dir / layout.LAST_CHECKPOINT, None,
                                   history, best, start_epoch - 1, samples_seen)
    best_path = out_dir / layout.BEST_CHECKPOINT
    total_steps = 0
    epoch = start_epoch - 1

    def save(epoch_done: int, extra: dict | None = None) -> str:
        return save_classifier(
            out_dir / layout.LAST_CHECKPOINT, model, optimizer=optimizer, config=to_dict(config),
            epoch=epoch_done, samples_seen=samples_seen, rng_state=capture_rng_state(),
            extra={"best": best, "history": history, "task": config.task,
                   "init_from": str(init_from) if init_from else None, **(extra or {})})

    try:
        for epoch in range(start_epoch, config.epochs + 1):
            # Every epoch reseeds its randomness: a resumed run repeats the epochs exactly.
            augment.reseed(config.seed * 7919 + epoch * 104729)
            budget = None if max_steps is None else max_steps - total_steps
            metrics, steps, seconds = _train_epoch(model, optimizer, sampler, augment, config,
                                                   device, epoch, trained, budget, progress)
            total_steps += steps
            train_metrics = metrics.compute()
            samples_seen += train_metrics["samples"]
            train_metrics["samples_per_s"] = train_metrics["samples"] / max(seconds, 1e-9)
            writers.scalars("trn", train_metrics, samples_seen)
            record = {"epoch": epoch, "samples_seen": samples_seen,
                      "train": _rounded(train_metrics)}
            stopping = max_steps is not None and total_steps >= max_steps
            if samples.val and (epoch == 1 or epoch % config.validation_cadence == 0
                                or epoch == config.epochs or stopping):
                val_metrics = evaluate_classifier(model, val_entries, samples.val,
                                                  device=device, amp=config.amp,
                                                  progress=progress).compute()
                writers.scalars("val", val_metrics, samples_seen)
                record["val"] = _rounded(val_metrics)
                if math.isfinite(val_metrics["auc"]) and (  # rounded alike, as stored
                        best is None or record["val"]["auc"] > best["auc"]):
                    best = {**record["val"], "epoch": epoch}
            history.append(record)
            log.info("epoch %d: %s", epoch, "; ".join(
                _line(split, record[key]) for split, key in (("train", "train"), ("val", "val"))
                if key in record))
            sha1 = save(epoch)
            if best is not None and best["epoch"] == epoch:
                copy_atomic(out_dir / layout.LAST_CHECKPOINT, best_path)
                log.info("new best classifier (val AUC %.4f): %s sha1 %s", best["auc"],
                         best_path, sha1)
            write_json_atomic({"history": history, "best": best}, out_dir / layout.METRICS_FILE)
            result.epochs_done = epoch
            if stopping:
                break
    except KeyboardInterrupt:
        # The weights so far, marked as the last completed epoch: a resume repeats this one.
        save(epoch - 1, {"interrupted_in_epoch": epoch})
        log.warning("interrupted in epoch %d; saved %s (resume with --resume)", epoch,
                    out_dir / layout.LAST_CHECKPOINT)
        result.interrupted = True
    finally:
        writers.close()
    result.samples_seen, result.best, result.history = samples_seen, best, history
    if best_path.exists():
        result.best_checkpoint = best_path
    return result
