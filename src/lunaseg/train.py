"""Training the U-Net: Adam on Dice + weighted false-negative Dice, TensorBoard, checkpoints.

A 3-class model (background, benign, malignant) trains on the same samples with class labels
and :func:`lunaseg.losses.class_segmentation_loss`; its metrics and pictures add the classes.

One process trains on the CPU or one GPU; under ``torchrun`` every rank trains on its own
share of samples with DistributedDataParallel, metrics are summed over ranks and rank 0
alone logs and saves.  A checkpoint is written after every epoch (so a killed run resumes
where it stopped) and ``checkpoint.best.pt`` follows the best validation.  Every
checkpoint carries the model's input spec, built from the training settings.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lunaseg import layout
from lunaseg.augment import SegmentationAugmentation
from lunaseg.cache import Cache, median_pixel_mm
from lunaseg.checkpoint import load_checkpoint
from lunaseg.config import TrainConfig, check_at_least, check_fraction, from_dict, to_dict
from lunaseg.datasets import (SeriesBatchSampler, SliceDataset, TrainingSampler,
                              check_cached_chunks, check_data_config, count_nodule_classes,
                              load_splits, rank_share, slice_labels, validation_items)
from lunaseg.errors import CheckpointError, ConfigError, DataError
from lunaseg.evaluate import CANDIDATE_FP_BUDGET
from lunaseg.files import copy_atomic, write_bytes_atomic, write_json_atomic
from lunaseg.inputs import SegmentationSpec, clip_hu, pad_to_multiple
from lunaseg.losses import class_segmentation_loss, segmentation_loss
from lunaseg.metrics import (SegmentationMetrics, blob_counts, class_pixel_counts, pixel_counts,
                             predicted_classes)
from lunaseg.model import build_model, check_classes, default_spec, nodule_probability, save_model
from lunaseg.progress import bar as progress_bar
from lunaseg.runtime import (autocast, capture_rng_state, resolve_device, restore_rng_state,
                             whole_slice_batch)
from lunaseg.validation import candidate_marks, score_candidates

__all__ = ["TrainResult", "train", "check_train_config", "training_spec", "resume_config",
           "evaluate_slices", "best_reason", "LAST_CHECKPOINT", "BEST_CHECKPOINT", "BEST_BY"]

log = logging.getLogger(__name__)

LAST_CHECKPOINT = layout.LAST_CHECKPOINT
BEST_CHECKPOINT = layout.BEST_CHECKPOINT
BEST_BY = ("candidates", "pixels")
IMAGE_SERIES = 12  # the book logs the first 12 series of a split...
IMAGE_SLICES = 6  # ...6 evenly spaced slices each


@dataclass
class TrainResult:
    """Where a run left its outputs and how its last validation went."""

    out_dir: Path
    tb_dir: Path
    checkpoint: Path
    best_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    epochs_done: int = 0
    samples_seen: int = 0
    interrupted: bool = False


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # train() joined the process group, so train() leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group), device


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics.

    DDP broadcasts buffers at the *start* of each forward pass, so after the last step of
    an epoch each rank holds running statistics updated with its own batch; without this,
    ranks would validate different models and differ from the saved checkpoint.
    """
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def training_spec(config: TrainConfig, pixel_mm: float | None = None) -> SegmentationSpec:
    """The input spec of the models a run trains: its HU window, context and U-Net depth,
    and the in-plane pixel spacing of its training scans."""
    return default_spec(config.model, min_hu=config.data.min_hu, max_hu=config.data.max_hu,
                        context_slices=config.data.context_slices, pixel_mm=pixel_mm)


def _forward_loss(model: nn.Module, input: torch.Tensor, label: torch.Tensor,
                  config: TrainConfig, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses (N,) and the model's probabilities (N, n_classes, H, W)."""
    if config.model.n_classes == 1:
        with autocast(device, config.amp):
            pred = model(input)
        pred = pred.float()
        loss = segmentation_loss(pred, label, config.fn_weight, bce_weight=config.bce_weight,
                                 reduction="none")
        return loss, pred
    # 3 classes: the loss takes logits (a saturated softmax loses the small probabilities),
    # through forward so that DDP syncs the gradients.
    with autocast(device, config.amp):
        logits = model(input, return_logits=True)
    logits = logits.float()
    loss = class_segmentation_loss(logits, label, config.fn_weight,
                                   bce_weight=config.bce_weight,
                                   class_weight=config.class_weight, reduction="none")
    return loss, torch.softmax(logits, dim=1)


def _pixel_counts(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The pixel counts SegmentationMetrics takes for a model with pred's classes."""
    return pixel_counts(pred, label) if pred.shape[1] == 1 else class_pixel_counts(pred, label)


def _blob_counts(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Blob counts of the nodule vs background decision, whatever the classes."""
    return blob_counts(nodule_probability(pred), label > 0)


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, progress: float) -> None:
    """Learning rate at ``progress`` (0 = first step, 1 = end of the last epoch).

    Computed from the position alone, so a resumed run needs no scheduler state.
    """
    lr = config.lr
    if config.lr_schedule == "cosine":
        final = config.lr * config.lr_final_fraction
        lr = final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _mine_hard_negatives(model: nn.Module, sampler: TrainingSampler, config: TrainConfig,
                         device: torch.device, epoch: int) -> int:
    """Let the sampler re-cut part of its negative pool where ``model`` is wrong now."""
    model.eval()

    def predict(input: torch.Tensor) -> torch.Tensor:
        with autocast(device, config.amp):
            output = model(input.contiguous(memory_format=torch.channels_last)).float()
        return nodule_probability(output)

    # no_grad, not inference_mode: the new crops are tensors that training keeps using.
    with torch.no_grad():
        return sampler.mine_hard_negatives(predict, epoch)


def evaluate_slices(model: nn.Module, cache: Cache, items: list[tuple[str, int]],
                    config: TrainConfig, device: torch.device, *, batch_size: int = 0,
                    progress: bool = False) -> SegmentationMetrics:
    """Loss and pixel counts of ``model`` on whole slices (validation or test split), with
    the input its spec asks for."""

    classes = config.model.n_classes
    dataset = SliceDataset(cache, items, model.spec, classes=classes)
    sampler = SeriesBatchSampler(items, whole_slice_batch(device, batch_size))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda")
    metrics = SegmentationMetrics(device, classes=classes)
    model.eval()
    with torch.inference_mode():
        for input, label, _, _ in progress_bar(loader, enabled=progress, desc="validate",
                                               unit="batch", leave=False):
            input = input.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            input = input.contiguous(memory_format=torch.channels_last)
            loss, pred = _forward_loss(model, input, label, config, device)
            metrics.update(loss, _pixel_counts(pred, label), _blob_counts(pred, label))
    return metrics


class _Logger:
    """TensorBoard writers (one per split, as the book has) plus overlay PNGs; rank 0 only."""

    def __init__(self, tb_dir: Path, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb_dir = tb_dir
        self.image_dir = out_dir / layout.OVERLAYS_DIR
        self._writers: dict = {}
        self._labels_logged: set[str] = set()
        self._legend_logged = False

    def writer(self, split: str):
        if split not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[split] = SummaryWriter(log_dir=str(self.tb_dir / split))
        return self._writers[split]

    def scalars(self, split: str, values: dict, samples_seen: int) -> None:
        if not self.enabled:
            return
        writer = self.writer(split)
        for tag, value in values.items():
            if "/" in tag and math.isfinite(value):
                writer.add_scalar(tag, value, samples_seen)
        writer.flush()

    def images(self, split: str, model: nn.Module, cache: Cache, uids: list[str],
               config: TrainConfig, device: torch.device, samples_seen: int, epoch: int) -> None:
        """Prediction overlays for the first 12 series x 6 evenly spaced slices of a split."""
        if not self.enabled or not uids:
            return
        from lunaseg.report import (CLASS_LEGEND_ITEMS, CLASS_OVERLAY_LEGEND, OVERLAY_LEGEND,
                                    class_overlay_rgb, overlay_rgb, with_legend)

        classes = config.model.n_classes
        writer = self.writer(split)
        if not self._legend_logged:
            writer.add_text("legend", OVERLAY_LEGEND if classes == 1 else CLASS_OVERLAY_LEGEND,
                            samples_seen)
            self._legend_logged = True
        # One class: the book's colours; three: a colour per class and one for the confusion.
        draw = overlay_rgb if classes == 1 else class_overlay_rgb
        legend = None if classes == 1 else CLASS_LEGEND_ITEMS
        model.eval()
        spec = model.spec
        for k, uid in enumerate(sorted(uids)[:IMAGE_SERIES]):
            entry = cache[uid]
            count = entry.hu.shape[0]
            indices = np.linspace(0, count - 1, IMAGE_SLICES + 2)[1:-1].round().astype(int)
            stacks = np.stack([pad_to_multiple(entry.context_stack(i, spec.context_slices),
                                               spec.size_multiple, int(spec.min_hu))
                               for i in indices])
            input = torch.from_numpy(clip_hu(stacks, spec)).to(device)
            input = input.contiguous(memory_format=torch.channels_last)
            step = whole_slice_batch(device)
            with torch.inference_mode(), autocast(device, config.amp):
                pred = torch.cat([model(input[i:i + step]).float()
                                  for i in range(0, len(input), step)])
            if classes == 1:
                pred = pred[:, 0].cpu().numpy() > 0.5
            else:
                pred = predicted_classes(pred)[:, 0].cpu().numpy()
            height, width = entry.hu.shape[1:]
            for j, index in enumerate(indices):
                label = slice_labels(entry, index, classes)
                rgb = draw(entry.hu[index], pred[j, :height, :width], label)
                writer.add_image(f"{split}/{k}_prediction_{j}", rgb, samples_seen,
                                 dataformats="HWC")
                name = f"epoch{epoch:03d}_{split}_{k:02d}_slice{int(index):03d}.png"
                write_bytes_atomic(_png_bytes(with_legend(rgb, legend)), self.image_dir / name)
                key = f"{split}/{k}/{j}"
                if key not in self._labels_logged:
                    self._labels_logged.add(key)
                    writer.add_image(f"{split}/{k}_label_{j}",
                                     draw(entry.hu[index], label, label), samples_seen,
                                     dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def _png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG (zlib level 1: a validation writes about 150 of these)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_better(metrics: dict, best: dict | None, min_recall: float | None = None,
               by: str = "pixels") -> bool:
    """Whether a validation beats the best so far.

    ``by="candidates"``: the highest sensitivity within the false-positive budget, ties
    broken by CPM (what the candidate stage is judged on).  ``by="pixels"``: the highest
    pixel recall, ties broken by F1 (the book's rule); with ``min_recall``, any validation
    reaching that recall beats those that do not, and among them the highest F1 wins.
    """
    if best is None:
        return True

    def key(m: dict) -> tuple:
        if by == "candidates":
            return (m.get("cand/sensitivity_at_budget", -1.0), m.get("cand/cpm", -1.0))
        if min_recall is not None and m["pr/recall"] >= min_recall:
            return (1, m["pr/f1_score"], m["pr/recall"])
        return (0, m["pr/recall"], m["pr/f1_score"])

    return key(_rounded(metrics)) > key(best)  # the best is stored rounded: compare alike


def _validate_candidates(model: nn.Module, cache: Cache, uids: list[str], device: torch.device,
                         dist_info: _Dist, amp: bool = False) -> dict:
    """Candidate metrics of the validation scans, each rank segmenting its share (in bf16
    where the run trains in it: half the time on a CPU with bf16 units)."""
    mine = uids[dist_info.rank::dist_info.world_size]
    findings, marks, counts, malignancy = candidate_marks(model, cache, mine, device, amp=amp)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * dist_info.world_size
        dist.all_gather_object(gathered, (findings, marks, counts, malignancy))
        findings, marks, counts, malignancy = {}, {}, [], {}
        for part_findings, part_marks, part_counts, part_malignancy in gathered:
            findings.update(part_findings)
            marks.update(part_marks)
            counts += part_counts
            malignancy.update(part_malignancy)
    return score_candidates(findings, marks, counts, malignancy)


def check_train_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for settings that cannot train.

    :func:`train` calls this before it creates or writes anything, so a bad setting fails
    in one line and leaves no half-made run folder behind.
    """
    for name in ("epochs", "batch_size", "validation_cadence"):
        check_at_least(config, name, 1)
    check_at_least(config, "num_workers", 0)
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {config.lr}")
    if config.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got "
                          f"{config.lr_schedule!r}")
    # Checked under either schedule: a value outside [0, 1] is a mistake either way.
    check_fraction(config, "lr_final_fraction")
    check_classes(config.model.n_classes)
    for name in ("fn_weight", "bce_weight", "class_weight"):
        weight = getattr(config, name)
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {weight}")
    check_fraction(config, "best_min_recall")
    if config.best_by not in BEST_BY:
        raise ConfigError(f"best_by must be one of {', '.join(BEST_BY)}, got {config.best_by!r}")
    # Every sample stacks 2 * context_slices + 1 slices as channels; check_data_config
    # makes the cached chunks agree with that count, this makes the model agree.
    if config.model.in_channels != config.data.channels:
        raise ConfigError(f"model.in_channels is {config.model.in_channels} but "
                          f"2 * data.context_slices + 1 = {config.data.channels}; "
                          f"make them equal")
    check_data_config(config.data)
    if config.model.padding and config.data.crop_px % config.model.size_multiple:
        raise ConfigError(f"crop_px {config.data.crop_px} must be a multiple of "
                          f"{config.model.size_multiple} for a U-Net of depth "
                          f"{config.model.depth}")


def _flat(data: dict, prefix: str = "") -> dict:
    """A nested config dict as {"data.crop_px": 64, ...}, tuples as lists (as in JSON)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def resume_config(saved: dict, requested: TrainConfig,
                  default: TrainConfig | None = None) -> TrainConfig:
    """The settings a resumed run continues with: the run's own (``saved``), with the device
    of ``requested`` and its epochs when they differ from ``default`` (so a larger number
    extends the run).  Other settings asked for (different from the default) that the run's
    own override are named in one warning."""
    default = default or TrainConfig()
    try:
        run = from_dict(TrainConfig, saved)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"the run's saved settings are not this lunaseg's: {error}") \
            from None
    asked, plain, own = (_flat(to_dict(c)) for c in (requested, default, run))
    ignored = [f"{key} {asked[key]} (the run's: {own[key]})" for key in asked
               if key not in ("epochs", "device") and asked[key] != plain[key]
               and asked[key] != own[key]]
    if ignored:
        log.warning("a resumed run continues with its own settings; ignoring %s",
                    ", ".join(ignored))
    epochs = requested.epochs if requested.epochs != default.epochs else run.epochs
    return replace(run, device=requested.device, epochs=epochs)


def train(config: TrainConfig, cache_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          tb_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          compile_model: bool = False, max_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train a U-Net on the cached dataset; see the module docstring for what is written.

    With ``resume`` (a checkpoint of an earlier run) the run continues with its own settings
    (:func:`resume_config`).  ``max_steps`` stops after that many optimizer steps in total.
    """
    check_train_config(config)
    dist_info, device = _init_distributed(config.device)
    try:
        return _train(config, cache_dir, out_dir, dist_info, device, tb_dir=tb_dir,
                      resume=resume, compile_model=compile_model, max_steps=max_steps,
                      progress=progress)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, cache_dir: str | os.PathLike, out_dir: str | os.PathLike,
           dist_info: _Dist, device: torch.device, *, tb_dir: str | os.PathLike | None,
           resume: str | os.PathLike | None, compile_model: bool, max_steps: int | None,
           progress: bool) -> TrainResult:

    torch.manual_seed(config.seed + dist_info.rank)
    out_dir = Path(out_dir)
    tb_dir = Path(tb_dir) if tb_dir is not None else out_dir / layout.TENSORBOARD_DIR
    cache = Cache(cache_dir)

    start_epoch, samples_seen, best, history = 1, 0, None, []
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        if checkpoint.format == "book" or checkpoint.config is None:
            raise CheckpointError(f"{resume}: not a lunaseg training checkpoint (no config); "
                                  f"it can be used with `lunaseg segment` but not resumed")
        config = resume_config(checkpoint.config, config)
        extra = checkpoint.extra or {}
        start_epoch = int(checkpoint.epoch) + 1
        samples_seen = int(checkpoint.samples_seen or 0)
        best, history = extra.get("best"), list(extra.get("history", []))
        # The checkpoint's settings replace the given ones: check them too (a hand-edited
        # or older file), still before the run folder is made.
        check_train_config(config)
    # Damaged entries skip their series (one warning), so the split is of what can be read;
    # a cache of chunks too small for the settings fails here, before the run folder exists.
    usable = cache.usable()
    check_cached_chunks(cache, usable, config.data)
    saved_splits = load_splits(out_dir / layout.SPLITS_FILE, cache.series_uids, config.data)
    splits = {name: [uid for uid in uids if uid in set(usable)]
              for name, uids in saved_splits.items()}
    if not splits["train"]:
        raise DataError(f"{cache.folder}: no series left for training after the split")
    if config.model.n_classes == 3:
        benign, malignant = count_nodule_classes(cache, splits["train"])
        if not (benign and malignant):
            raise DataError(f"{cache.folder}: a 3-class model needs benign and malignant "
                            f"nodules to learn from; the training series hold {benign} benign "
                            f"and {malignant} malignant (malignancy comes from "
                            f"annotations_with_malignancy.csv: is it in the data folder?)")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_orphans(out_dir)
        write_json_atomic(saved_splits, out_dir / layout.SPLITS_FILE)
        write_json_atomic(to_dict(config), out_dir / layout.RUN_CONFIG_FILE)

    spec = training_spec(config, median_pixel_mm(cache, splits["train"]))
    model = build_model(config.model, spec).to(device)
    # channels_last: faster convolutions on GPUs and (by ~40%) with oneDNN on CPUs too.
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        if checkpoint.optimizer_state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        if checkpoint.rng_state:
            restore_rng_state(checkpoint.rng_state)
        log.info("resuming from %s at epoch %d (%d samples seen)", resume, start_epoch,
                 samples_seen)
    train_model: nn.Module = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        train_model = torch.compile(train_model)

    sampler = TrainingSampler(cache, splits["train"], config.data, device, model.spec,
                              seed=config.seed, rank=dist_info.rank,
                              world_size=dist_info.world_size, classes=config.model.n_classes)
    augment = SegmentationAugmentation(config.augment, seed=config.seed)
    logger = _Logger(tb_dir, out_dir, dist_info.is_main)
    val_items = validation_items(cache, splits["val"], full_ct=config.data.full_ct_validation)
    result = TrainResult(out_dir, tb_dir, out_dir / LAST_CHECKPOINT, None, history, best,
                         start_epoch - 1, samples_seen)
    steps_per_epoch = sampler.steps_per_epoch(config.batch_size)
    total_steps = 0
    epoch = start_epoch - 1
    epoch_start_samples = samples_seen

    def save(epoch_done: int, extra: dict | None = None) -> str:
        return save_model(
            out_dir / LAST_CHECKPOINT, model, optimizer=optimizer, config=to_dict(config),
            epoch=epoch_done, samples_seen=samples_seen, rng_state=capture_rng_state(),
            extra={"best": best, "history": history, **(extra or {})})

    log.info("training on %s: %d train / %d val / %d test series, %d nodule chunks, "
             "%d steps of %d per epoch", device, len(splits["train"]), len(splits["val"]),
             len(splits["test"]), len(sampler.positives), steps_per_epoch, config.batch_size)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            # Every epoch reseeds its own randomness, so a resumed run repeats exactly the
            # epochs an uninterrupted one would have run.
            augment.reseed(config.seed * 7919 + epoch * 104729 + dist_info.rank)
            if epoch > 1 and config.data.hard_negative_fraction:
                mined = _mine_hard_negatives(model, sampler, config, device, epoch)
                log.info("epoch %d: %d of %d negative crops re-cut at false positives", epoch,
                         mined, len(sampler.negatives) if sampler.negatives else 0)
            epoch_start_samples = samples_seen
            model.train()
            metrics = SegmentationMetrics(device, classes=config.model.n_classes)
            started = time.perf_counter()
            bar = progress_bar(sampler.batches(epoch, config.batch_size), total=steps_per_epoch,
                               enabled=progress and dist_info.is_main,
                               desc=f"epoch {epoch}/{config.epochs}", unit="step")
            for step, (input, label) in enumerate(bar):
                _set_lr(optimizer, config, (epoch - 1 + step / steps_per_epoch) / config.epochs)
                input, label = augment(input, label)
                input = input.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                loss, pred = _forward_loss(train_model, input, label, config, device)
                loss.mean().backward()
                optimizer.step()
                metrics.update(loss.detach(), _pixel_counts(pred.detach(), label))
                samples_seen += input.shape[0] * dist_info.world_size
                total_steps += 1
                rate = bar.n * config.batch_size * dist_info.world_size / max(
                    time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.0f} samples/s", refresh=False)
                if max_steps is not None and total_steps >= max_steps:
                    break
            bar.close()
            if dist_info.world_size > 1:
                _broadcast_buffers(model)
            metrics.all_reduce()
            train_metrics = metrics.compute()
            # After all_reduce "samples" already counts every rank's samples.
            train_metrics["samples_per_s"] = train_metrics["samples"] / max(
                time.perf_counter() - started, 1e-9)
            train_metrics["opt/lr"] = optimizer.param_groups[0]["lr"]
            logger.scalars("trn", train_metrics, samples_seen)
            record = {"epoch": epoch, "samples_seen": samples_seen,
                      "train": _rounded(train_metrics)}
            validate = (epoch == 1 or epoch % config.validation_cadence == 0
                        or epoch == config.epochs or
                        (max_steps is not None and total_steps >= max_steps))
            if validate and val_items:
                val = evaluate_slices(model, cache, rank_share(val_items, dist_info.rank,
                                                               dist_info.world_size),
                                      config, device, progress=progress and dist_info.is_main)
                val.all_reduce()
                val_metrics = val.compute()
                val_metrics.update(_validate_candidates(model, cache, splits["val"], device,
                                                        dist_info, config.amp))
                logger.scalars("val", val_metrics, samples_seen)
                record["val"] = _rounded(val_metrics)
                if dist_info.is_main:
                    logger.images("val", model, cache, splits["val"], config, device,
                                  samples_seen, epoch)
                    logger.images("trn", model, cache, splits["train"], config, device,
                                  samples_seen, epoch)
                if _is_better(val_metrics, best, config.best_min_recall, config.best_by):
                    best = {**_rounded(val_metrics), "epoch": epoch}
            history.append(record)
            log.info("epoch %d: %s", epoch, _summary_line(record))
            if dist_info.is_main:
                sha1 = save(epoch)
                if best is not None and best["epoch"] == epoch:
                    copy_atomic(out_dir / LAST_CHECKPOINT, out_dir / BEST_CHECKPOINT)
                    log.info("new best model (%s): %s sha1 %s", best_reason(best, config),
                             out_dir / BEST_CHECKPOINT, sha1)
                write_json_atomic({"history": history, "best": best},
                                   out_dir / layout.METRICS_FILE)
            result.epochs_done = epoch
            if max_steps is not None and total_steps >= max_steps:
                break
    except KeyboardInterrupt:
        # The end-of-epoch checkpoint stays as it is: resuming from it repeats the
        # interrupted epoch exactly as an uninterrupted run would have run it.
        if dist_info.is_main:
            where = (f"{out_dir / LAST_CHECKPOINT} holds epoch {epoch - 1}; --resume repeats "
                     f"epoch {epoch}" if epoch > 1 else "no epoch was complete yet")
            log.warning("interrupted in epoch %d: %s", epoch, where)
        samples_seen = epoch_start_samples
        result.interrupted = True
    finally:
        logger.close()
    result.samples_seen, result.best, result.history = samples_seen, best, history
    if (out_dir / BEST_CHECKPOINT).exists():
        result.best_checkpoint = out_dir / BEST_CHECKPOINT
    return result


def _remove_orphans(out_dir: Path) -> None:
    """Temporary files a killed save left in the run folder (never the real files)."""
    for orphan in out_dir.glob(".*.tmp"):
        orphan.unlink(missing_ok=True)


def best_reason(best: dict, config: TrainConfig) -> str:
    """Why the best checkpoint is the best, in a few words (for logs and the run summary)."""
    if config.best_by == "candidates" and "cand/sensitivity_at_budget" in best:
        return (f"epoch {best['epoch']}: sensitivity {best['cand/sensitivity_at_budget']:.3f} "
                f"within {CANDIDATE_FP_BUDGET:g} false positives per scan, CPM "
                f"{best['cand/cpm']:.3f} on {best.get('cand_count/scans', '?')} validation "
                f"scans")
    return (f"epoch {best['epoch']}: validation pixel recall {best['pr/recall']:.3f}, "
            f"F1 {best['pr/f1_score']:.3f}")


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _summary_line(record: dict) -> str:
    parts = []
    for split in ("train", "val"):
        if split in record:
            m = record[split]
            part = (f"{split} loss {m['loss/all']:.4f} recall {m['pr/recall']:.3f} "
                    f"precision {m['pr/precision']:.3f} fp {m['percent_all/fp']:.0f}%")
            if "pr_malignant/recall" in m:
                part += (f", recall benign {m['pr_benign/recall']:.3f} malignant "
                         f"{m['pr_malignant/recall']:.3f}, found pixels' class balanced "
                         f"accuracy {m['confusion/balanced_accuracy']:.3f}")
            if "blobs/recall" in m:
                part += (f", nodule blobs found {m['blobs/recall']:.3f}, "
                         f"{m['blobs/fp_per_slice']:.1f} FP blobs per slice")
            if "cand/cpm" in m:
                part += (f"; candidates: sensitivity {m['cand/sensitivity']:.3f}, "
                         f"{m['cand/sensitivity_at_budget']:.3f} within "
                         f"{CANDIDATE_FP_BUDGET:g} FP per scan, CPM {m['cand/cpm']:.3f}, "
                         f"{m['cand/per_scan']:.1f} per scan")
                if "cand/malignancy_auc" in m:
                    part += f", malignancy AUC {m['cand/malignancy_auc']:.3f} on those found"
            parts.append(part)
    return "; ".join(parts)
