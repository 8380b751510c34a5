"""Nodule candidates from a logit volume (numpy only): components, centres, scores.

Foreground is ``probability > threshold`` (strictly, as the book), tested on logits.  A
binary erosion (6-neighbour cross, ``erosion_iterations`` times) separates blobs that touch;
then 3D connected components (6-connectivity, scipy's and the book's: merging loses nodules,
splitting only adds a false positive).  What happens to the eroded components is the
model's *grouping* (its input spec says which, ``SegmentConfig.grouping`` overrides):

* ``"lunaseg"``: components erosion would erase entirely are kept un-eroded (flagged
  ``uneroded``: at 2.5 mm slices a 3-5 mm nodule is 1-2 slices thick and one erosion deletes
  it), the volume's edge does not erode (a nodule cut by the first slice is not thinner than
  what we see), and each core grows back over its thresholded voxels (a voxel shared by
  several cores goes to the nearest, in mm), so sizes measure what the model segmented.
  Centres are weighted by probability: a dense neighbour the model barely marks, such as the
  pleura, does not pull a small nodule's centre off it.
* ``"book"``: the book's code: erased components are dropped, the edge erodes, each
  candidate is its eroded core, centres are weighted by HU (clipped to [-1000, 1000] + 1001).
  Models that mark blobs liberally (the book's own) need it: kept, their specks flood the list.

Candidates are ranked by logits, never by probabilities: float32 rounds the book's model's
probability to 1.0 on hundreds of blobs, where their logits still differ.  The "book"
grouping ranks by a component's highest logit (the book's highest probability, unrounded),
"lunaseg" by its mean logit; ties go to the other of the two, then to size.  Measured on
real CT with the book's model and on held-out phantoms with lunaseg's (docs/results.md),
each ranks its own models' nodules higher.  The probability written for a candidate
(:func:`score_probability`) is the sigmoid of its ranking logit up to p = 0.9975 (logit 6)
and a log-compressed logit beyond, so it stays in [0, 1] and in the ranking's order where
float64 sigmoids would round to 1.  ``center_xyz`` = ``Geometry.irc_to_xyz`` of the (continuous)
centre, right for any direction matrix; ``diameter_mm`` is of the sphere with the
component's physical volume.

With a 3-class model's malignancy logits (:mod:`lunaseg.predict`) each candidate carries
the same two verdicts the second stage gives (``p_nodule``, ``p_malignant``, kept as
log-odds): p(nodule) = 1 - p(background), the mean over its voxels (``mean_probability``),
and p(malignant | nodule), its voxels' weighted by their p(nodule), i.e. the mean softmax
p(malignant) divided by the mean p(nodule).  The classifier's verdicts, when it runs
(:mod:`lunaseg.detect`), replace them, so every table has one column of each.  The ranking
does not use them: the candidate stage finds nodules, whatever their class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit

from lunaseg.config import SegmentConfig
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.inputs import GROUPINGS
from lunaseg.masks import resolve_lung_mask

__all__ = ["Candidate", "NODULE_THRESHOLD", "extract_candidates", "label_candidates",
           "check_extraction", "score_probability", "threshold_logit"]

# p(nodule) from which the classifier's verdict counts as "nodule" in summaries (the book's).
NODULE_THRESHOLD = 0.5

# Logits up to this are written as their sigmoid; beyond, log-compressed (see the docstring).
_LINEAR_LOGIT = 6.0


@dataclass(frozen=True)
class Candidate:
    """One connected component of the segmentation: a possible nodule."""

    series_uid: str
    rank: int  # 0 = best; label ``rank + 1`` in the label map
    center_irc: tuple[float, float, float]  # continuous (index, row, col)
    center_xyz: tuple[float, float, float]  # patient mm
    diameter_mm: float  # sphere of the same physical volume
    volume_mm3: float
    voxels: int
    score: float  # the ranking logit: the mean logit ("lunaseg") or the highest ("book")
    max_logit: float
    mean_logit: float
    max_probability: float  # float32 sigmoids, as the network reports them
    mean_probability: float
    mean_hu: float
    slice_span: tuple[int, int]  # first and last slice index (inclusive)
    bbox_irc: tuple[int, int, int, int, int, int]  # low (i, r, c), high (i, r, c), inclusive
    uneroded: bool  # erosion would have erased it; kept as segmented
    # Verdicts as log-odds (they do not saturate as float32 softmax outputs do): a 3-class
    # U-Net's own, from its softmax over the component's voxels (label_candidates), or the
    # second stage's, which replace them (lunaseg.detect); None while no model has given one.
    nodule_log_odds: float | None = None  # p(nodule)
    malignant_log_odds: float | None = None  # p(malignant | nodule)
    rank_log_odds: float | None = None  # what the classifier's judged candidates rank by

    @property
    def probability(self) -> float:
        """The score written to the submission CSV, in [0, 1] (:func:`score_probability`):
        what the second stage ranks by once it has judged the candidate, else the
        segmentation's score."""
        if self.rank_log_odds is not None:
            return score_probability(self.rank_log_odds)
        return score_probability(self.score)

    @property
    def p_nodule(self) -> float | None:
        """p(nodule): the classifier's verdict once it has run, else a 3-class U-Net's mean
        p(nodule) = 1 - p(background) over the voxels (None for a 1-class U-Net alone)."""
        return None if self.nodule_log_odds is None else _sigmoid(self.nodule_log_odds)

    @property
    def p_malignant(self) -> float | None:
        """p(malignant | nodule): the malignancy model's verdict, else a 3-class U-Net's
        (its voxels' p(malignant | nodule) weighted by their p(nodule)); None without
        either.  For a 3-class U-Net ``p_nodule * p_malignant`` is the mean softmax
        p(malignant) over the voxels."""
        return None if self.malignant_log_odds is None else _sigmoid(self.malignant_log_odds)

    @property
    def judged(self) -> bool:
        """Whether the second stage (the nodule classifier) has judged and ranked it."""
        return self.rank_log_odds is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["probability"] = self.probability
        data["p_nodule"], data["p_malignant"] = self.p_nodule, self.p_malignant
        for key in ("center_irc", "center_xyz", "slice_span", "bbox_irc"):
            data[key] = list(data[key])
        return data


def score_probability(logit: float) -> float:
    """A candidate's logit as a score in [0, 1], strictly increasing in the logit."""
    z = float(logit)
    if abs(z) > _LINEAR_LOGIT:
        z = math.copysign(_LINEAR_LOGIT * (1.0 + math.log1p(abs(z) / _LINEAR_LOGIT - 1.0)), z)
    return 1.0 / (1.0 + math.exp(-z))


def _sigmoid(z: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * float(z)))


def threshold_logit(threshold: float) -> float:
    """The logit of a probability threshold (foreground is logit > this)."""
    return math.log(threshold / (1.0 - threshold)) if threshold > 0 else -math.inf


def check_extraction(config: SegmentConfig) -> None:
    """ConfigError naming the first extraction setting that cannot work."""
    if not 0.0 <= config.threshold < 1.0:
        raise ConfigError(f"segment.threshold must be in [0, 1), got {config.threshold}")
    if config.erosion_iterations < 0:
        raise ConfigError(f"segment.erosion_iterations must be >= 0, "
                          f"got {config.erosion_iterations}")
    if config.min_voxels < 1:
        raise ConfigError(f"segment.min_voxels must be >= 1, got {config.min_voxels}")
    if config.grouping is not None and config.grouping not in GROUPINGS:
        raise ConfigError(f"segment.grouping must be one of {', '.join(GROUPINGS)}, got "
                          f"{config.grouping!r}")


_CROSS = ndimage.generate_binary_structure(3, 1)


def _components(foreground: np.ndarray, iterations: int, grouping: str,
                spacing_irc: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Label map after erosion -> (labels int32, count, uneroded flags[count + 1])."""
    labels0, n0 = ndimage.label(foreground, _CROSS)
    labels0 = labels0.astype(np.int32, copy=False)
    if iterations == 0 or n0 == 0:
        return labels0, n0, np.zeros(n0 + 1, dtype=bool)
    book = grouping == "book"
    eroded = ndimage.binary_erosion(foreground, structure=_CROSS, iterations=iterations,
                                    border_value=0 if book else 1)
    labels1, n1 = ndimage.label(eroded, _CROSS)
    labels1 = labels1.astype(np.int32, copy=False)
    if book:
        return labels1, n1, np.zeros(n1 + 1, dtype=bool)
    # Every eroded core lies inside exactly one original component (its parent).
    parent = np.zeros(n1 + 1, dtype=np.int64)
    parent[labels1[eroded]] = labels0[eroded]
    children = np.bincount(parent[1:], minlength=n0 + 1)
    children[0] = 0

    lut = np.zeros(n0 + 1, dtype=np.int32)
    single = np.flatnonzero(children[parent[1:]] == 1) + 1  # cores alone in their parent
    lut[parent[single]] = single
    vanished = np.flatnonzero(children[1:] == 0) + 1  # parents whose every voxel eroded
    lut[vanished] = n1 + 1 + np.arange(vanished.size, dtype=np.int32)
    count = n1 + vanished.size
    labels = lut[labels0]  # single-core and vanished parents: the whole original component

    # Parents split into several cores: each voxel goes to the nearest core (in mm).
    split = np.flatnonzero(children >= 2)
    if split.size:
        boxes = ndimage.find_objects(labels0)
        for p in split:
            box = boxes[p - 1]
            region = labels0[box] == p
            seeds = np.where(region, labels1[box], 0)
            nearest_index = ndimage.distance_transform_edt(
                seeds == 0, sampling=spacing_irc, return_distances=False, return_indices=True)
            nearest = seeds[tuple(nearest_index)]
            labels[box][region] = nearest[region]
    uneroded = np.zeros(count + 1, dtype=bool)
    uneroded[n1 + 1:] = True
    return labels, count, uneroded


def _label_stats(labels: np.ndarray, count: int, logits: np.ndarray, hu: np.ndarray,
                 grouping: str, malignancy_logits: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """Per-label statistics (index k = label k) from the labelled voxels only."""
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    n = count + 1
    voxels = np.bincount(lab, minlength=n)
    z = logits.ravel()[flat].astype(np.float64)
    p = (1.0 / (1.0 + np.exp(-logits.ravel()[flat].astype(np.float32)))).astype(np.float64)
    h = np.clip(hu.ravel()[flat].astype(np.float64), -1000.0, 1000.0)
    weights = h + 1001.0 if grouping == "book" else np.maximum(p, 1e-6)
    irc = np.unravel_index(flat, labels.shape)
    weight_sum = np.bincount(lab, weights, minlength=n)
    safe = np.where(weight_sum > 0, weight_sum, 1.0)
    center = np.stack([np.bincount(lab, weights * axis, minlength=n) / safe for axis in irc], 1)
    per_voxel = np.maximum(voxels, 1)
    stats = {
        "voxels": voxels,
        "center_irc": center,
        "mean_logit": np.bincount(lab, z, minlength=n) / per_voxel,
        "mean_probability": np.bincount(lab, p, minlength=n) / per_voxel,
        "mean_hu": np.bincount(lab, h, minlength=n) / per_voxel,
    }
    if malignancy_logits is not None:
        m = malignancy_logits.ravel()[flat].astype(np.float64)
        stats.update(_class_log_odds(lab, n, z, m))
    # Max / min per label: sort by label once, then reduce each run.
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]]) if lab.size else \
        np.zeros(0, dtype=np.int64)
    present = sorted_lab[starts]

    def per_label(values: np.ndarray, ufunc: np.ufunc, fill: float) -> np.ndarray:
        out = np.full(n, fill, dtype=np.float64)
        if starts.size:
            out[present] = ufunc.reduceat(values[order], starts)
        return out

    stats["max_logit"] = per_label(z, np.maximum, -np.inf)
    stats["max_probability"] = per_label(p, np.maximum, 0.0)
    stats["low_irc"] = np.stack([per_label(axis, np.minimum, 0) for axis in irc], 1)
    stats["high_irc"] = np.stack([per_label(axis, np.maximum, 0) for axis in irc], 1)
    return stats


def _log_ratio(lab: np.ndarray, n: int, yes: np.ndarray, no: np.ndarray) -> np.ndarray:
    """Per label, log(sum of ``yes``) - log(sum of ``no``): the log-odds of a mean
    probability from the probabilities of both outcomes, which stays finite where the mean
    itself would round to 1."""
    tiny = np.finfo(np.float64).tiny
    return (np.log(np.maximum(np.bincount(lab, yes, minlength=n), tiny))
            - np.log(np.maximum(np.bincount(lab, no, minlength=n), tiny)))


def _class_log_odds(lab: np.ndarray, n: int, nodule_logits: np.ndarray,
                    malignancy_logits: np.ndarray) -> dict[str, np.ndarray]:
    """A 3-class model's verdicts per label (float64 voxel logits in, log-odds out): of the
    mean p(nodule), and of p(malignant | nodule) weighted by each voxel's p(nodule)."""
    p_nodule, p_background = expit(nodule_logits), expit(-nodule_logits)
    return {
        "nodule_log_odds": _log_ratio(lab, n, p_nodule, p_background),
        "malignant_log_odds": _log_ratio(lab, n, p_nodule * expit(malignancy_logits),
                                         p_nodule * expit(-malignancy_logits)),
    }


def label_candidates(logits: np.ndarray, hu: np.ndarray, geometry: Geometry,
                     config: SegmentConfig | None = None, *, grouping: str = "lunaseg",
                     lung_mask: np.ndarray | None = None, series_uid: str = "",
                     malignancy_logits: np.ndarray | None = None
                     ) -> tuple[list[Candidate], np.ndarray]:
    """Candidates (best first) and their (I, R, C) int32 label map: label k + 1 is
    candidate k.  See :func:`extract_candidates` for the arguments."""
    config = config or SegmentConfig()
    check_extraction(config)
    grouping = config.grouping or grouping
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    logits = np.asarray(logits)
    hu = np.asarray(hu)
    if logits.ndim != 3 or logits.shape != hu.shape:
        raise ValueError(f"logits {logits.shape} and hu {hu.shape} must be the same 3D shape")
    if malignancy_logits is not None and np.shape(malignancy_logits) != logits.shape:
        raise ValueError(f"malignancy_logits {np.shape(malignancy_logits)} must have the "
                         f"logits' shape {logits.shape}")
    spacing_irc = geometry.spacing_xyz[::-1].copy()
    labels, count, uneroded = _components(logits > threshold_logit(config.threshold),
                                          config.erosion_iterations, grouping, spacing_irc)

    # Drop components that are too small or (optionally) outside the lungs.
    keep = np.ones(count + 1, dtype=bool)
    keep[0] = False
    if count:
        voxels = np.bincount(labels.ravel(), minlength=count + 1)
        keep &= voxels >= config.min_voxels
        lung_mask = resolve_lung_mask(lung_mask, hu, spacing_irc, config.lung_mask)
        if lung_mask is not None:
            # Whole components are kept when any voxel touches the lung, so a nodule on
            # the pleura keeps its full extent.
            touching = np.bincount(labels[lung_mask], minlength=count + 1) > 0
            keep &= touching
    kept = np.flatnonzero(keep)
    if kept.size < count:
        lut = np.zeros(count + 1, dtype=np.int32)
        lut[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
        labels = lut[labels]
        uneroded = np.r_[False, uneroded[kept]]
        count = kept.size
    if count == 0:
        return [], np.zeros(logits.shape, dtype=np.int32)

    stats = _label_stats(labels, count, logits, hu, grouping,
                         None if malignancy_logits is None else np.asarray(malignancy_logits))
    ids = np.arange(1, count + 1)
    # Rank: the grouping's score, then the other logit, then size (all descending).
    first, second = (("max_logit", "mean_logit") if grouping == "book" else
                     ("mean_logit", "max_logit"))
    order = ids[np.lexsort((ids, -stats["voxels"][ids], -stats[second][ids],
                            -stats[first][ids]))]
    voxel_mm3 = float(np.prod(geometry.spacing_xyz) * abs(np.linalg.det(geometry.direction)))
    centers_irc = stats["center_irc"][order]
    centers_xyz = geometry.irc_to_xyz(centers_irc)
    candidates = []
    for rank, (label, irc, xyz) in enumerate(zip(order, centers_irc, centers_xyz)):
        volume = float(stats["voxels"][label]) * voxel_mm3
        low = stats["low_irc"][label].astype(int)
        high = stats["high_irc"][label].astype(int)
        candidates.append(Candidate(
            series_uid=series_uid,
            rank=rank,
            center_irc=tuple(float(v) for v in irc),
            center_xyz=tuple(float(v) for v in xyz),
            diameter_mm=float((6.0 * volume / math.pi) ** (1.0 / 3.0)),
            volume_mm3=volume,
            voxels=int(stats["voxels"][label]),
            score=float(stats[first][label]),
            max_logit=float(stats["max_logit"][label]),
            mean_logit=float(stats["mean_logit"][label]),
            max_probability=float(stats["max_probability"][label]),
            mean_probability=float(stats["mean_probability"][label]),
            mean_hu=float(stats["mean_hu"][label]),
            slice_span=(int(low[0]), int(high[0])),
            bbox_irc=tuple(int(v) for v in (*low, *high)),
            uneroded=bool(uneroded[label]),
            nodule_log_odds=_optional(stats, "nodule_log_odds", label),
            malignant_log_odds=_optional(stats, "malignant_log_odds", label),
        ))
    # Renumber so that label k + 1 is candidates[k].
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[order] = np.arange(1, count + 1, dtype=np.int32)
    return candidates, lut[labels]


def _optional(stats: dict[str, np.ndarray], key: str, label: int) -> float | None:
    """``stats[key][label]`` as a float, None when the statistic was not computed."""
    return float(stats[key][label]) if key in stats else None


def extract_candidates(logits: np.ndarray, hu: np.ndarray, geometry: Geometry,
                       config: SegmentConfig | None = None, *, grouping: str = "lunaseg",
                       lung_mask: np.ndarray | None = None, series_uid: str = "",
                       malignancy_logits: np.ndarray | None = None) -> list[Candidate]:
    """Nodule candidates from a logit volume, best first.

    logits : (I, R, C) float logits (see :mod:`lunaseg.predict`); hu : (I, R, C) HU of the
    same scan.  ``grouping`` is the model's (``config.grouping``, when set, wins).
    ``lung_mask`` (I, R, C) bool keeps only components touching it; without it,
    ``config.lung_mask`` computes one with :func:`lunaseg.masks.lung_mask`.
    ``malignancy_logits`` (I, R, C), a 3-class model's logits of p(malignant | nodule), give
    each candidate its ``p_nodule`` and ``p_malignant`` (see the module docstring).
    """
    return label_candidates(logits, hu, geometry, config, grouping=grouping,
                            lung_mask=lung_mask, series_uid=series_uid,
                            malignancy_logits=malignancy_logits)[0]
