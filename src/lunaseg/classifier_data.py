"""The classifier's samples, as it will meet candidates: annotated nodules against
candidates.csv's look-alikes and the segmentation model's own false positives.

Every crop is cut from the prepcache (:meth:`lunaseg.cache.SeriesCache.chunk`), never from
the ``.mhd`` files.  Positives are the cached nodules of a split (for malignancy: the
malignant ones, against the benign ones); negatives are the cached look-alikes and the
candidates a U-Net finds far from every nodule and excluded finding.  Those candidates are
computed once per run and kept as JSON beside it.  :class:`CropSampler` balances an epoch
the book's way: one positive, then ``negatives_per_positive`` negatives.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lunaseg.cache import Cache, SeriesCache
from lunaseg.config import ClassifierDataConfig, SegmentConfig, check_at_least, to_dict
from lunaseg.ct import CT
from lunaseg.errors import ConfigError, DataError
from lunaseg.files import write_json_atomic
from lunaseg.geometry import Geometry
from lunaseg.progress import bar as progress_bar

__all__ = ["CropSample", "nodule_samples", "lookalike_samples", "avoided_findings",
           "series_ct", "segmentation_candidates", "segmentation_negatives", "CropSampler",
           "cut_samples", "check_classifier_data_config", "SOURCES", "MAX_STORED_CANDIDATES"]

log = logging.getLogger(__name__)

SOURCES = ("nodule", "lookalike", "segmentation")
# Per series, the most segmentation candidates stored (highest score first): an untrained
# U-Net can mark thousands of blobs.
MAX_STORED_CANDIDATES = 2000
_CANDIDATES_FORMAT = 1


@dataclass(frozen=True)
class CropSample:
    """One crop to cut: a full-volume voxel of a cached series and its class."""

    series_uid: str
    center_irc: tuple[int, int, int]
    label: bool  # the positive class: nodule (or, for malignancy, malignant)
    source: str  # one of SOURCES


def check_classifier_data_config(config: ClassifierDataConfig) -> None:
    """ConfigError naming the first sampling setting that cannot work."""
    if not config.max_hu > config.min_hu:
        raise ConfigError(f"need min_hu < max_hu, got {config.min_hu}, {config.max_hu}")
    check_at_least(config, "val_stride", 2)
    check_at_least(config, "test_stride", 0)
    check_at_least(config, "negatives_per_positive", 0, " (0 = no balancing)")
    check_at_least(config, "epoch_samples", 0, " (0 = each positive once)")
    check_at_least(config, "segmentation_negatives", 0)
    if not (math.isfinite(config.min_distance_diameters) and config.min_distance_diameters >= 0):
        raise ConfigError(f"min_distance_diameters must be a finite number >= 0, got "
                          f"{config.min_distance_diameters}")


def nodule_samples(cache: Cache, series_uids: Sequence[str], task: str = "nodule"
                   ) -> list[CropSample]:
    """The cached nodules of ``series_uids``: all positive (``task`` "nodule"), or positive
    when malignant (``task`` "malignancy")."""
    samples = []
    for uid in series_uids:
        for nodule in cache[uid].nodules:
            label = True if task == "nodule" else bool(nodule.is_malignant)
            samples.append(CropSample(uid, tuple(int(v) for v in nodule.center_irc), label,
                                      "nodule"))
    return samples


def lookalike_samples(cache: Cache, series_uids: Sequence[str]) -> list[CropSample]:
    """candidates.csv's non-nodule rows the cache kept (off every nodule mask): negatives."""
    return [CropSample(uid, tuple(int(v) for v in center), False, "lookalike")
            for uid in series_uids for center in cache[uid].lookalikes_irc]


def avoided_findings(cache: Cache, series_uids: Sequence[str],
                     data_dir: str | os.PathLike | None = None
                     ) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Per series, (centre xyz, diameter mm) of everything a negative must keep away from:
    the cached nodules and, with ``data_dir``, its excluded findings and the candidates.csv
    nodules no annotation matched (unknown sizes count as LUNA16's 10 mm)."""
    from lunaseg.luna import (EXCLUDED_FILE, UNKNOWN_DIAMETER_SCORED_MM, load_candidates,
                              read_nodules)

    wanted = set(series_uids)
    found: dict[str, list[tuple[np.ndarray, float]]] = {uid: [] for uid in series_uids}
    for uid in series_uids:
        for nodule in cache[uid].nodules:
            found[uid].append((np.asarray(nodule.center_xyz, float), float(nodule.diameter_mm)))
    if data_dir is None:
        return found

    def size(diameter: float) -> float:
        return float(diameter) if diameter > 0 else UNKNOWN_DIAMETER_SCORED_MM

    excluded = Path(data_dir) / EXCLUDED_FILE
    if excluded.exists():
        for finding in read_nodules(excluded, excluded=True, available=wanted):
            found[finding.series_uid].append((np.asarray(finding.center_xyz, float),
                                              size(finding.diameter_mm)))
    for uid, records in load_candidates(data_dir, series_on_disk=wanted).items():
        for record in records:
            if record.is_nodule and not record.has_annotation:
                found[uid].append((np.asarray(record.center_xyz, float), size(0.0)))
    return found


def series_ct(entry: SeriesCache) -> CT:
    """The cached (body-cropped) volume of a series as a :class:`CT` whose geometry places it
    where it lies in the scan, so candidates come out in patient millimetres."""
    row0, col0 = entry.crop_rc
    geometry = entry.geometry
    origin = geometry.irc_to_xyz(np.array([0.0, row0, col0]))
    shifted = Geometry(origin, geometry.spacing_xyz, geometry.direction)
    return CT(np.asarray(entry.hu), shifted, entry.series_uid)


def _model_key(model: nn.Module | str | os.PathLike) -> tuple[nn.Module, str, str]:
    if isinstance(model, nn.Module):
        return model, type(model).__name__, f"module:{type(model).__name__}"
    from lunaseg.model import load_model

    loaded, checkpoint = load_model(model)
    return loaded, str(model), f"sha1:{checkpoint.sha1}"


def segmentation_candidates(model: nn.Module | str | os.PathLike, cache: Cache,
                            series_uids: Sequence[str], path: str | os.PathLike, *,
                            segment: SegmentConfig | None = None,
                            device: str | torch.device | None = None,
                            progress: bool = True) -> dict[str, list[dict]]:
    """Candidates of a segmentation model (a U-Net checkpoint or module) on each cached
    series: ``{uid: [{"center_irc", "center_xyz", "score"}, ...]}``, best score first,
    ``center_irc`` in full-volume voxels.

    Kept in ``path`` (JSON): series already there for the same model file (SHA1) and
    settings are not segmented again, and the file is rewritten after every new series, so
    an interrupted run keeps what it finished.
    """
    from lunaseg.segment import segment_ct

    segment = segment or SegmentConfig()
    path = Path(path)
    stored: dict = {}
    settings = {k: v for k, v in to_dict(segment).items()
                if k not in ("device", "overlays", "write_volumes", "batch_size")}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: unreadable candidates file ({error}); delete it") from None
    todo = [uid for uid in series_uids if uid not in stored.get("series", {})]
    if not todo:
        # Nothing to segment: the model file need not even be read.
        return {uid: stored["series"][uid] for uid in series_uids}
    module, name, key = _model_key(model)
    if stored.get("model_key") != key or stored.get("segment") != settings or \
            stored.get("format") != _CANDIDATES_FORMAT:
        if stored:
            log.info("%s was made with another model or settings; segmenting again", path)
        stored = {"format": _CANDIDATES_FORMAT, "model": name, "model_key": key,
                  "segment": settings, "series": {}}
        todo = list(series_uids)
    for uid in progress_bar(todo, enabled=progress, desc="segmentation candidates",
                            unit="scan"):
        entry = cache[uid]
        result = segment_ct(module, series_ct(entry), segment, device=device)
        offset = np.array([0, *entry.crop_rc])
        rows = []
        for candidate in result.candidates[:MAX_STORED_CANDIDATES]:
            irc = np.rint(np.asarray(candidate.center_irc)).astype(np.int64) + offset
            rows.append({"center_irc": [int(v) for v in irc],
                         "center_xyz": [round(float(v), 3) for v in candidate.center_xyz],
                         "score": round(float(candidate.probability), 6)})
        stored["series"][uid] = rows
        write_json_atomic(stored, path)
        log.debug("%s: %d segmentation candidates", uid, len(rows))
    return {uid: stored["series"][uid] for uid in series_uids}


def segmentation_negatives(candidates: dict[str, list[dict]],
                           findings: dict[str, list[tuple[np.ndarray, float]]],
                           config: ClassifierDataConfig) -> list[CropSample]:
    """The best-scoring ``config.segmentation_negatives`` candidates per series that lie
    farther than ``min_distance_diameters`` diameters from every finding."""
    samples = []
    for uid, rows in candidates.items():
        kept = 0
        for row in rows:
            if kept >= config.segmentation_negatives:
                break
            xyz = np.asarray(row["center_xyz"], dtype=np.float64)
            if any(np.linalg.norm(xyz - center) <= config.min_distance_diameters * diameter
                   for center, diameter in findings.get(uid, [])):
                continue
            samples.append(CropSample(uid, tuple(row["center_irc"]), False, "segmentation"))
            kept += 1
    return samples


def cut_samples(entries: dict[str, SeriesCache], samples: Sequence[CropSample],
                size_irc: Sequence[int], fill_hu: int = -1000) -> np.ndarray:
    """(N, *size_irc) int16 HU crops of ``samples`` centred as
    :func:`lunaseg.classify.cut_crops` centres them (centre voxel at ``size // 2``)."""
    size = tuple(int(n) for n in size_irc)
    out = np.empty((len(samples), *size), dtype=np.int16)
    for k, sample in enumerate(samples):
        out[k] = entries[sample.series_uid].chunk(sample.center_irc, size, fill_hu=fill_hu)[0]
    return out


def _cycle(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``count`` indices into ``size`` items: whole shuffled passes, then part of one."""
    if count <= 0 or size <= 0:
        return np.zeros(0, dtype=np.int64)
    passes = [rng.permutation(size) for _ in range(-(-count // size))]
    return np.concatenate(passes)[:count]


class CropSampler:
    """Epochs of training samples, balanced, and their crops cut from the cache.

    With ``negatives_per_positive`` r > 0 every (r + 1)-th sample is a positive, the others
    negatives (the book's ``--balanced`` for r = 1), each list cycled through in a new random
    order every epoch; with r = 0 every sample is drawn as often as any other.  An epoch has
    ``epoch_samples`` samples, or one pass over the positives with their negatives.  The
    draws depend only on ``seed`` and the epoch, so a resumed run repeats them.
    """

    def __init__(self, cache: Cache, positives: Sequence[CropSample],
                 negatives: Sequence[CropSample], config: ClassifierDataConfig,
                 size_irc: Sequence[int], seed: int = 0) -> None:
        if not positives:
            raise DataError(f"{cache.folder}: no positive training samples")
        if not negatives:
            raise DataError(f"{cache.folder}: no negative training samples")
        self.positives = list(positives)
        self.negatives = list(negatives)
        self.config = config
        self.size_irc = tuple(int(n) for n in size_irc)
        self.seed = seed
        uids = {s.series_uid for s in self.positives + self.negatives}
        self.entries = {uid: cache[uid] for uid in sorted(uids)}

    @property
    def samples_per_epoch(self) -> int:
        if self.config.epoch_samples:
            return self.config.epoch_samples
        ratio = self.config.negatives_per_positive
        if ratio == 0:
            return len(self.positives) + len(self.negatives)
        return len(self.positives) * (1 + ratio)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(self.samples_per_epoch / batch_size))

    def epoch(self, epoch: int) -> list[CropSample]:
        """The samples of one epoch, in training order."""
        rng = np.random.default_rng([self.seed, epoch, 11])
        count = self.samples_per_epoch
        ratio = self.config.negatives_per_positive
        if ratio == 0:
            pool = self.positives + self.negatives
            return [pool[k] for k in _cycle(rng, len(pool), count)]
        is_positive = np.arange(count) % (ratio + 1) == 0
        positives = iter(_cycle(rng, len(self.positives), int(is_positive.sum())))
        negatives = iter(_cycle(rng, len(self.negatives), int((~is_positive).sum())))
        return [self.positives[next(positives)] if flag else self.negatives[next(negatives)]
                for flag in is_positive]

    def batches(self, epoch: int, batch_size: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray, list[CropSample]]]:
        """(crops (B, *size_irc) int16, labels (B,) bool, samples) for one epoch."""
        samples = self.epoch(epoch)
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            yield (cut_samples(self.entries, part, self.size_irc),
                   np.array([s.label for s in part], dtype=bool), part)
