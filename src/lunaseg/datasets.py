"""Samples cut from the prepcache: training crops and whole validation slices.

Training does not go through a DataLoader: every training chunk (a few hundred KB per
nodule) is held in one tensor on the training device and each batch is cut from it with one
gather, so data loading costs microseconds and never starves a GPU.  Validation reads whole
slices (context stacks) through an ordinary ``Dataset``.

Labels are what a model with ``classes`` outputs learns: the nodule mask (bool) for one, the
class mask (uint8: 0 background, 1 benign, 2 malignant) for three.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, Sampler

from lunaseg.cache import Cache, SeriesCache
from lunaseg.config import DataConfig, check_at_least, check_fraction
from lunaseg.errors import ConfigError, DataError
from lunaseg.inputs import SegmentationSpec, clip_hu, pad_to_multiple

__all__ = ["split_series", "load_splits", "check_data_config", "check_cached_chunks",
           "CropBank", "positive_bank", "negative_bank", "TrainingSampler", "SliceDataset",
           "SeriesBatchSampler", "validation_items", "rank_share", "as_labels",
           "slice_labels", "count_nodule_classes"]

log = logging.getLogger(__name__)

_LUNG_HU = -600.0  # a negative crop's neighbourhood must be at least partly this airy
MIN_EPOCH_SAMPLES = 2048  # of an epoch sized to the data (DataConfig.epoch_samples = 0)
_MIN_LUNG_SHARE = 0.3


def split_series(series_uids: Sequence[str], config: DataConfig) -> dict[str, list[str]]:
    """Split by series, never by slice: sorted; every ``val_stride``-th validates, then every
    ``test_stride``-th of the rest is held out for testing (0 = no test split)."""
    uids = sorted(series_uids)
    check_at_least(config, "val_stride", 2)
    val = uids[::config.val_stride]
    rest = [uid for k, uid in enumerate(uids) if k % config.val_stride]
    test = rest[::config.test_stride] if config.test_stride > 0 else []
    train = [uid for uid in rest if uid not in set(test)]
    return {"train": train, "val": val, "test": test}


def load_splits(path: Path, series_uids: Sequence[str], config: DataConfig, *,
                strict: bool = True) -> dict[str, list[str]]:
    """A run's saved splits (``path``, written once when it started), else a new split of
    ``series_uids``.

    Splits are saved so that a resumed run, and every evaluation of its models, uses the
    series it was trained and validated on.  With ``strict`` (training) a saved list naming
    a series that is not in ``series_uids`` is an error (delete the file to split again);
    without it (evaluating on a partial download) such series are left to the caller.
    """
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: unreadable splits file ({error})") from None
        if not isinstance(splits, dict) or not all(
                isinstance(splits.get(name), list) for name in ("train", "val", "test")):
            raise DataError(f"{path}: not a splits file (needs train, val and test lists)")
        missing = sorted(set(sum(splits.values(), [])) - set(series_uids))
        if missing and strict:
            raise DataError(f"{path}: lists {len(missing)} series that are not here "
                            f"(first: {missing[0]}); delete it to split again")
        return splits
    return split_series(series_uids, config)


def check_data_config(config: DataConfig) -> None:
    """Raise :class:`ConfigError` for sampling settings that cannot work.

    ``lunaseg.train`` calls this before it writes anything; :class:`TrainingSampler` calls
    it again (and :func:`split_series` checks ``val_stride``) for callers that use them
    directly.
    """
    check_at_least(config, "val_stride", 2)
    check_at_least(config, "context_slices", 0)
    check_at_least(config, "crop_px", 1)
    if not config.max_hu > config.min_hu:
        raise ConfigError(f"need min_hu < max_hu, got {config.min_hu}, {config.max_hu}")
    check_at_least(config, "epoch_samples", 0, " (0 = one pass over the nodule chunks)")
    check_fraction(config, "full_slice_fraction")
    fraction = config.negative_crop_fraction
    if not 0 <= fraction < 1:
        raise ConfigError(f"negative_crop_fraction must be in [0, 1), got {fraction}")
    check_fraction(config, "hard_negative_fraction")
    if config.hard_negative_fraction > 0 and fraction == 0:
        raise ConfigError("hard_negative_fraction needs negative_crop_fraction > 0")


def as_labels(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """A class mask as a model with ``n_classes`` outputs learns it: the nodule mask (bool)
    for one class, the classes themselves (uint8) for three."""
    return classes > 0 if n_classes == 1 else classes.astype(np.uint8, copy=False)


def slice_labels(entry: SeriesCache, index: int, n_classes: int) -> np.ndarray:
    """(r, c) labels of one cached slice for a model with ``n_classes`` outputs (the 1-class
    mask is read without unpacking the malignant plane)."""
    return entry.mask_slice(index) if n_classes == 1 else entry.classes_slice(index)


def count_nodule_classes(cache: Cache, series_uids: Sequence[str]) -> tuple[int, int]:
    """(benign, malignant) annotated nodules with a cached chunk in these series."""
    malignant = [n.is_malignant for uid in series_uids for n in cache[uid].nodules]
    return len(malignant) - sum(malignant), sum(malignant)


# ----------------------------------------------------------------------------- training


class CropBank:
    """Chunks (N, C, S, S) with their centre-slice labels (N, S, S: bool masks or uint8
    classes), on one device."""

    def __init__(self, hu: torch.Tensor, label: torch.Tensor):
        if hu.shape[0] != label.shape[0] or hu.shape[-2:] != label.shape[-2:]:
            raise ValueError(f"chunks {tuple(hu.shape)} and labels {tuple(label.shape)} differ")
        self.hu = hu
        self.label = label

    def __len__(self) -> int:
        return int(self.hu.shape[0])

    def to(self, device: torch.device | str) -> "CropBank":
        return CropBank(self.hu.to(device), self.label.to(device))

    def crops(self, index: torch.Tensor, crop_px: int, generator: torch.Generator,
              *, random_offset: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, crop, crop) int16 and (B, 1, crop, crop) labels (the bank's dtype) at random
        offsets (book: 0..31 for 64 out of 96).

        On a CPU each crop is a slice copied row by row (0.6 ms for 32 crops of 7x48x48);
        one gather of every voxel through a flat index took 5 ms, advanced indexing 24 ms.
        On a GPU the gather is one kernel, where a loop would be one launch per crop.
        """
        size = self.hu.shape[-1]
        if crop_px > size:
            raise ConfigError(f"crop_px {crop_px} is larger than the cached chunks ({size})")
        device = self.hu.device
        batch = index.shape[0]
        if random_offset:
            offset = torch.randint(0, size - crop_px + 1, (batch, 2), generator=generator,
                                   device=generator.device).to(device)
        else:
            offset = torch.full((batch, 2), (size - crop_px) // 2, device=device)
        if device.type == "cpu":
            picks = list(zip(index.tolist(), offset.tolist()))
            hu = torch.stack([self.hu[n, :, r:r + crop_px, c:c + crop_px] for n, (r, c) in picks])
            label = torch.stack([self.label[n, r:r + crop_px, c:c + crop_px]
                                 for n, (r, c) in picks])
            return hu, label.unsqueeze(1)
        return self._gather(index.to(device), offset, crop_px)

    def _gather(self, index: torch.Tensor, offset: torch.Tensor, crop_px: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of :meth:`crops` through one flat index per array."""
        channels, size = self.hu.shape[1], self.hu.shape[-1]
        steps = torch.arange(crop_px, device=index.device)
        plane = (steps[:, None] * size + steps[None, :]).reshape(-1)  # one crop in a slice
        start = offset[:, 0] * size + offset[:, 1]
        label_flat = (index * size * size + start)[:, None] + plane[None, :]
        label = self.label.reshape(-1)[label_flat].view(-1, 1, crop_px, crop_px)
        slices = torch.arange(channels, device=index.device) * size * size
        hu_flat = ((index * channels * size * size + start)[:, None, None]
                   + slices[None, :, None] + plane[None, None, :])
        hu = self.hu.reshape(-1)[hu_flat].view(-1, channels, crop_px, crop_px)
        return hu, label


def _chunk_label(chunk_masks: np.ndarray) -> np.ndarray:
    return chunk_masks[:, chunk_masks.shape[1] // 2]


def check_cached_chunks(cache: Cache, series_uids: Sequence[str],
                        config: DataConfig) -> tuple[int, int, int]:
    """The (slices, rows, cols) of the cached training chunks, which must be one size for
    every series, square, with ``2 * context_slices + 1`` slices (a crop's channels are its
    chunk's slices, a whole slice's the slices around it: one model takes both) and at
    least ``crop_px`` wide; else a DataError saying how to prepcache."""
    sizes = {cache[uid].chunk_irc for uid in series_uids}
    if not sizes:
        raise DataError(f"{cache.folder}: no series to train on")
    if len(sizes) > 1:
        raise DataError(f"{cache.folder}: cached chunks differ in size between series "
                        f"({', '.join(map(str, sorted(sizes)))}); run prepcache again")
    slices, rows, cols = sizes.pop()
    hint = f"prepcache with --chunk {config.channels},{max(rows, config.crop_px)}," \
           f"{max(rows, config.crop_px)}"
    if rows != cols:
        raise DataError(f"{cache.folder}: cached chunks are {rows}x{cols}, not square; {hint}")
    if slices != config.channels:
        raise DataError(f"{cache.folder}: cached chunks have {slices} slices but "
                        f"2 * context_slices + 1 = {config.channels}; {hint}")
    if config.crop_px > rows:
        raise DataError(f"{cache.folder}: crop_px {config.crop_px} is larger than the cached "
                        f"chunks ({rows} px); {hint}")
    return slices, rows, cols


def positive_bank(cache: Cache, series_uids: Sequence[str], config: DataConfig, *,
                  classes: int = 1) -> CropBank:
    """One chunk per annotated nodule of the given series (read from the cache), labelled
    for a model with ``classes`` outputs."""
    check_cached_chunks(cache, series_uids, config)
    chunks, labels = [], []
    for uid in series_uids:
        entry = cache[uid]
        if len(entry.chunks):
            chunks.append(entry.chunks)
            labels.append(as_labels(_chunk_label(entry.chunk_masks), classes))
    if not chunks:
        raise DataError(f"{cache.folder}: the training series hold no annotated nodule")
    return CropBank(torch.from_numpy(np.concatenate(chunks)),
                    torch.from_numpy(np.concatenate(labels)))


def negative_bank(cache: Cache, series_uids: Sequence[str], size_irc: Sequence[int],
                  count: int, rng: np.random.Generator, *, classes: int = 1) -> CropBank:
    """``count`` chunks away from nodules, so the model also learns what is *not* a nodule.

    Half sit on candidate look-alikes (vessels and the like: the hard negatives, where the
    dataset lists them), a quarter on random tissue inside the lungs and a quarter on random
    tissue anywhere in the body (chest wall, heart, bone), which whole-slice validation and
    inference show the model although nodule chunks never do.  Labels come from the mask,
    so a crop grazing a nodule stays honest.
    """
    size = np.asarray(size_irc)
    entries = [cache[uid] for uid in series_uids]
    chunks, labels = [], []
    attempts = 0
    while len(chunks) < count and attempts < 50 * count + 100:
        attempts += 1
        entry = entries[rng.integers(len(entries))]
        draw = rng.random()
        if len(entry.lookalikes_irc) and draw < 0.5:
            center = entry.lookalikes_irc[rng.integers(len(entry.lookalikes_irc))]
        else:
            hu = entry.hu
            local = np.array([rng.integers(n) for n in hu.shape])
            if hu[tuple(local)] <= _LUNG_HU:  # want tissue, not air
                continue
            center = local + np.array([0, *entry.crop_rc])
        hu_chunk, mask_chunk = entry.chunk(center, size)
        if mask_chunk[size[0] // 2].any() and len(chunks) % 4:
            continue  # mostly pure negatives; one in four may touch a nodule's edge
        in_lung = (hu_chunk[size[0] // 2] < _LUNG_HU).mean() >= _MIN_LUNG_SHARE
        if 0.5 <= draw < 0.75 and not in_lung:
            continue
        chunks.append(hu_chunk)
        labels.append(as_labels(mask_chunk[size[0] // 2], classes))
    if len(chunks) < count:
        log.warning("found only %d of %d negative crops", len(chunks), count)
    if not chunks:
        return CropBank(torch.zeros((0, *size), dtype=torch.int16),
                        torch.zeros((0, *size[1:]),
                                    dtype=torch.bool if classes == 1 else torch.uint8))
    return CropBank(torch.from_numpy(np.stack(chunks)), torch.from_numpy(np.stack(labels)))


@dataclass
class TrainingSampler:
    """Yields training batches: random crops of nodule chunks, mixed with negative crops and,
    for a share of steps, whole slices (chapter exercises 4 and the FP-cutting options).

    Each DDP rank passes its ``rank`` / ``world_size`` and draws its own share of samples.
    Labels are for a model with ``classes`` outputs (see the module docstring).
    """

    cache: Cache
    series_uids: Sequence[str]
    config: DataConfig
    device: torch.device
    spec: SegmentationSpec  # the model's input: HU window, context, size multiple
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    classes: int = 1

    def __post_init__(self) -> None:
        check_data_config(self.config)
        self.chunk_irc = check_cached_chunks(self.cache, self.series_uids, self.config)
        self.positives = positive_bank(self.cache, self.series_uids, self.config,
                                       classes=self.classes).to(self.device)
        fraction = self.config.negative_crop_fraction
        self.negatives: CropBank | None = None
        if fraction > 0:
            # A pool four times what one epoch of positives asks for keeps negatives varied.
            count = max(16, int(4 * len(self.positives) * fraction / (1 - fraction)))
            rng = np.random.default_rng([self.seed, 1])
            self.negatives = negative_bank(self.cache, self.series_uids, self.chunk_irc,
                                           count, rng, classes=self.classes).to(self.device)
        self._static_negatives = self.negatives
        self._slices = [(uid, int(i)) for uid in self.series_uids
                        for i in self.cache[uid].positive_indices]

    @property
    def samples_per_epoch(self) -> int:
        if self.config.epoch_samples:
            return self.config.epoch_samples
        # One pass over the nodule chunks, plus the negatives mixed in with them; a small
        # dataset still gets epochs long enough to learn from between validations.
        one_pass = len(self.positives) / (1 - self.config.negative_crop_fraction)
        return max(math.ceil(one_pass), MIN_EPOCH_SAMPLES)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(self.samples_per_epoch / (batch_size * self.world_size)))

    def batches(self, epoch: int, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input (B, C, H, W) float HU clipped, label (B, 1, H, W)) for one epoch."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + epoch * 1009 + self.rank) & 0x7FFF_FFFF)
        rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
        for _ in range(self.steps_per_epoch(batch_size)):
            if self.config.full_slice_fraction > 0 and rng.random() < \
                    self.config.full_slice_fraction:
                yield self._full_slice_batch(batch_size, rng)
            else:
                yield self._crop_batch(batch_size, generator, rng)

    def mine_hard_negatives(self, predict: Callable[[torch.Tensor], torch.Tensor],
                            epoch: int) -> int:
        """Re-cut ``hard_negative_fraction`` of the negative pool at the model's false positives.

        ``predict`` maps a (1, C, H, W) float input to (1, 1, H, W) nodule probabilities
        (call this under ``torch.no_grad``).  Random training slices are segmented; every
        false-positive blob (probability > 0.5, no nodule label) becomes a crop centre, so
        the model is shown exactly what it still gets wrong: vessel branches, pleura, the
        diaphragm.  The rest of the pool stays the initial mix.  Deterministic for a given
        model and epoch, so a resumed run mines the same crops.  Returns the number of hard
        crops now in the pool.
        """
        fraction = self.config.hard_negative_fraction
        if not fraction or self._static_negatives is None or not len(self._static_negatives):
            return 0
        rng = np.random.default_rng([self.seed, epoch, self.rank, 3])
        size = np.asarray(self.chunk_irc)
        centers: list[tuple[str, np.ndarray]] = []
        for _ in range(self.config.hard_negative_slices):
            uid = self.series_uids[rng.integers(len(self.series_uids))]
            entry = self.cache[uid]
            index = int(rng.integers(entry.hu.shape[0]))
            stack = pad_to_multiple(entry.context_stack(index, self.spec.context_slices),
                                    self.spec.size_multiple, int(self.spec.min_hu))
            prob = predict(self._to_input(torch.from_numpy(stack[None]).to(self.device)))
            height, width = entry.hu.shape[1:]
            wrong = (prob[0, 0, :height, :width] > 0.5).cpu().numpy() & ~entry.mask_slice(index)
            blobs, count = ndimage.label(wrong)
            if not count:
                continue
            # One centre per blob, at a random pixel of it: big vessel trees do not crowd out
            # the many small false positives.
            pixels = np.flatnonzero(blobs)
            order = rng.permutation(pixels.size)
            owners = blobs.ravel()[pixels[order]]
            _, first = np.unique(owners, return_index=True)
            for flat in pixels[order[first]]:
                row, col = divmod(int(flat), width)
                centers.append((uid, np.array([index, row + entry.crop_rc[0],
                                               col + entry.crop_rc[1]])))
        want = min(len(centers), int(round(fraction * len(self._static_negatives))))
        static = self._static_negatives
        if want == 0:
            self.negatives = static
            return 0
        chosen = rng.choice(len(centers), size=want, replace=False)
        chunks, labels = [], []
        for k in chosen:
            uid, center = centers[k]
            hu_chunk, mask_chunk = self.cache[uid].chunk(center, size)
            chunks.append(hu_chunk)
            labels.append(as_labels(mask_chunk[size[0] // 2], self.classes))
        keep = torch.from_numpy(rng.choice(len(static), size=len(static) - want,
                                           replace=False)).to(static.hu.device)
        self.negatives = CropBank(
            torch.cat([static.hu[keep], torch.from_numpy(np.stack(chunks)).to(self.device)]),
            torch.cat([static.label[keep],
                       torch.from_numpy(np.stack(labels)).to(self.device)]))
        return want

    def _crop_batch(self, batch_size: int, generator: torch.Generator,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n_negative = 0
        if self.negatives is not None and len(self.negatives):
            n_negative = int(rng.binomial(batch_size, self.config.negative_crop_fraction))
        n_positive = batch_size - n_negative
        parts = []
        for bank, count in ((self.positives, n_positive), (self.negatives, n_negative)):
            if count:
                index = torch.randint(len(bank), (count,), generator=generator,
                                      device=generator.device)
                parts.append(bank.crops(index, self.config.crop_px, generator))
        hu = torch.cat([p[0] for p in parts])
        label = torch.cat([p[1] for p in parts])
        return self._to_input(hu), label

    def _full_slice_batch(self, batch_size: int, rng: np.random.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole slices, about as many pixels as a crop batch (at least one slice); half are
        slices with a nodule, half anywhere in the scan."""
        uid = self.series_uids[rng.integers(len(self.series_uids))]
        entry = self.cache[uid]
        area = entry.hu.shape[1] * entry.hu.shape[2]
        count = max(1, round(batch_size * self.config.crop_px ** 2 / area))
        inputs, labels = [], []
        for _ in range(count):
            if len(entry.positive_indices) and rng.random() < 0.5:
                index = int(rng.choice(entry.positive_indices))
            else:
                index = int(rng.integers(entry.hu.shape[0]))
            inputs.append(pad_to_multiple(entry.context_stack(index, self.spec.context_slices),
                                          self.spec.size_multiple, int(self.spec.min_hu)))
            labels.append(pad_to_multiple(slice_labels(entry, index, self.classes)[None],
                                          self.spec.size_multiple, 0))
        hu = torch.from_numpy(np.stack(inputs)).to(self.device)
        label = torch.from_numpy(np.stack(labels)).to(self.device)
        return self._to_input(hu), label

    def _to_input(self, hu: torch.Tensor) -> torch.Tensor:
        return hu.float().clamp_(self.spec.min_hu, self.spec.max_hu)


# ----------------------------------------------------------------------------- validation


def validation_items(cache: Cache, series_uids: Sequence[str], *, full_ct: bool
                     ) -> list[tuple[str, int]]:
    """(series, slice) pairs: slices with a nodule, or every slice with ``full_ct``."""
    items = []
    for uid in sorted(series_uids):
        entry = cache[uid]
        indices = range(entry.hu.shape[0]) if full_ct else entry.positive_indices
        items.extend((uid, int(i)) for i in indices)
    return items


class SliceDataset(Dataset):
    """Whole slices as a model with ``spec`` takes them: ((C, H, W) float32, (1, H, W) label
    for a model with ``classes`` outputs, series, index), H and W the cached (body-cropped)
    size padded to the spec's multiple."""

    def __init__(self, cache: Cache, items: Sequence[tuple[str, int]], spec: SegmentationSpec,
                 *, classes: int = 1):
        self.cache = cache
        self.items = list(items)
        self.spec = spec
        self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        uid, index = self.items[k]
        entry = self.cache[uid]
        stack = clip_hu(entry.context_stack(index, self.spec.context_slices), self.spec)
        stack = pad_to_multiple(stack, self.spec.size_multiple, self.spec.min_hu)
        label = pad_to_multiple(slice_labels(entry, index, self.classes)[None],
                                self.spec.size_multiple, 0)
        return torch.from_numpy(stack), torch.from_numpy(label), uid, index


class SeriesBatchSampler(Sampler[list[int]]):
    """Batches of consecutive items from one series (so every batch has one slice size)."""

    def __init__(self, items: Sequence[tuple[str, int]], batch_size: int):
        self.batches: list[list[int]] = []
        current: list[int] = []
        for k, (uid, _) in enumerate(items):
            if current and (len(current) == batch_size or items[current[0]][0] != uid):
                self.batches.append(current)
                current = []
            current.append(k)
        if current:
            self.batches.append(current)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rank_share(items: Sequence[tuple[str, int]], rank: int, world_size: int
              ) -> list[tuple[str, int]]:
    """This rank's share of validation items (whole series per rank keep batches uniform)."""
    uids = sorted({uid for uid, _ in items})
    mine = set(uids[rank::world_size])
    return [item for item in items if item[0] in mine]

