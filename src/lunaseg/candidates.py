"""Nodule candidates from a probability volume (numpy only): components, centres, scores.

Decisions (and how they differ from the book):

* Foreground is ``probability > threshold`` (strictly greater, as the book).
* Erosion (6-neighbour cross, ``erosion_iterations`` times) separates blobs that touch.
  The volume's edge does not erode (``border_value=1``): a nodule cut by the first or last
  slice is not thinner than the part we can see.  Components that erosion would erase
  entirely are kept un-eroded (``SegmentConfig.keep_vanished``, flagged ``uneroded``): at
  2.5 mm slices a 3-5 mm nodule is 1-2 slices thick and one 3D erosion deletes it.  After
  erosion each surviving core is grown back over its original thresholded voxels (a voxel
  shared by several cores goes to the nearest one, in mm), so voxel counts and diameters
  measure what the model segmented, not the eroded core.
* Connected components use 6-connectivity (scipy's and the book's choice): it merges fewer
  neighbouring structures than 26-connectivity, and merging loses nodules while splitting
  only adds a false positive.
* Centre: the centre of mass weighted by probability.  The book weights by HU (clipped to
  [-1000, 1000] plus 1001), so a dense neighbour the model barely marks, such as the pleura
  or a vessel wall, pulls a small nodule's centre outside its radius.  ``center_xyz`` =
  ``Geometry.irc_to_xyz`` of that (continuous) voxel position, right for any direction
  matrix.
* Diameter: of the sphere with the component's physical volume
  (voxels * |det(direction)| * prod(spacing)).
* Ranking score (the submission's ``probability``): the component's maximum probability
  (the book's habit), or its mean with ``SegmentConfig.score = "mean"``; ties are broken by
  the other of the two, then by size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from lunaseg.config import SegmentConfig
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.masks import resolve_lung_mask

__all__ = ["Candidate", "extract_candidates", "label_candidates", "check_extraction"]

_CENTER_WEIGHTINGS = ("hu", "probability", "uniform")
_SCORES = ("mean", "max")


@dataclass(frozen=True)
class Candidate:
    """One connected component of the segmentation: a possible nodule."""

    series_uid: str
    rank: int  # 0 = highest probability; label ``rank + 1`` in SegmentResult.labels
    center_irc: tuple[float, float, float]  # continuous (index, row, col)
    center_xyz: tuple[float, float, float]  # patient mm
    diameter_mm: float  # sphere of the same physical volume
    volume_mm3: float
    voxels: int
    max_probability: float
    mean_probability: float
    score: float  # the ranking score: max or mean probability (SegmentConfig.score)
    mean_hu: float
    slice_span: tuple[int, int]  # first and last slice index (inclusive)
    bbox_irc: tuple[int, int, int, int, int, int]  # low (i, r, c), high (i, r, c), inclusive
    uneroded: bool  # erosion would have erased it; kept as segmented

    @property
    def probability(self) -> float:
        """The ranking score, as written to the submission CSV."""
        return self.score

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["probability"] = self.probability
        for key in ("center_irc", "center_xyz", "slice_span", "bbox_irc"):
            data[key] = list(data[key])
        return data


def check_extraction(config: SegmentConfig) -> None:
    """ConfigError naming the first extraction setting that cannot work."""
    if not 0.0 <= config.threshold < 1.0:
        raise ConfigError(f"segment.threshold must be in [0, 1), got {config.threshold}")
    if config.erosion_iterations < 0:
        raise ConfigError(f"segment.erosion_iterations must be >= 0, "
                          f"got {config.erosion_iterations}")
    if config.connectivity not in (6, 26):
        raise ConfigError(f"segment.connectivity must be 6 or 26, got {config.connectivity}")
    if config.center_weighting not in _CENTER_WEIGHTINGS:
        raise ConfigError(f"segment.center_weighting must be one of "
                          f"{', '.join(_CENTER_WEIGHTINGS)}, got {config.center_weighting!r}")
    if config.score not in _SCORES:
        raise ConfigError(f"segment.score must be one of {', '.join(_SCORES)}, got "
                          f"{config.score!r}")
    if config.min_voxels < 1:
        raise ConfigError(f"segment.min_voxels must be >= 1, got {config.min_voxels}")


def _components(foreground: np.ndarray, config: SegmentConfig,
                spacing_irc: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Label map after erosion (grown back) -> (labels int32, count, uneroded flags[count+1])."""
    structure = ndimage.generate_binary_structure(3, 1 if config.connectivity == 6 else 3)
    labels0, n0 = ndimage.label(foreground, structure)
    labels0 = labels0.astype(np.int32, copy=False)
    if config.erosion_iterations == 0 or n0 == 0:
        return labels0, n0, np.zeros(n0 + 1, dtype=bool)

    cross = ndimage.generate_binary_structure(3, 1)
    eroded = ndimage.binary_erosion(foreground, structure=cross,
                                    iterations=config.erosion_iterations, border_value=1)
    labels1, n1 = ndimage.label(eroded, structure)
    # Every eroded core lies inside exactly one original component (its parent).
    parent = np.zeros(n1 + 1, dtype=np.int64)
    parent[labels1[eroded]] = labels0[eroded]
    children = np.bincount(parent[1:], minlength=n0 + 1)
    children[0] = 0

    lut = np.zeros(n0 + 1, dtype=np.int32)
    single = np.flatnonzero(children[parent[1:]] == 1) + 1  # cores alone in their parent
    lut[parent[single]] = single
    vanished = np.flatnonzero(children[1:] == 0) + 1  # parents whose every voxel eroded
    count = n1
    if config.keep_vanished and vanished.size:
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


def _label_stats(labels: np.ndarray, count: int, prob: np.ndarray, hu: np.ndarray,
                 weighting: str) -> dict[str, np.ndarray]:
    """Per-label statistics (index k = label k) from the labelled voxels only."""
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    n = count + 1
    voxels = np.bincount(lab, minlength=n)
    p = prob.ravel()[flat].astype(np.float64)
    h = np.clip(hu.ravel()[flat].astype(np.float64), -1000.0, 1000.0)
    if weighting == "hu":
        weights = h + 1001.0
    elif weighting == "probability":
        weights = np.maximum(p, 1e-6)
    else:
        weights = np.ones_like(p)
    irc = np.unravel_index(flat, labels.shape)
    weight_sum = np.bincount(lab, weights, minlength=n)
    safe = np.where(weight_sum > 0, weight_sum, 1.0)
    center = np.stack([np.bincount(lab, weights * axis, minlength=n) / safe for axis in irc], 1)
    stats = {
        "voxels": voxels,
        "center_irc": center,
        "mean_probability": np.bincount(lab, p, minlength=n) / np.maximum(voxels, 1),
        "mean_hu": np.bincount(lab, h, minlength=n) / np.maximum(voxels, 1),
    }
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

    stats["max_probability"] = per_label(p, np.maximum, 0.0)
    stats["low_irc"] = np.stack([per_label(axis, np.minimum, 0) for axis in irc], 1)
    stats["high_irc"] = np.stack([per_label(axis, np.maximum, 0) for axis in irc], 1)
    return stats


def label_candidates(prob: np.ndarray, hu: np.ndarray, geometry: Geometry,
                     config: SegmentConfig | None = None, *,
                     lung_mask: np.ndarray | None = None, series_uid: str = ""
                     ) -> tuple[list[Candidate], np.ndarray]:
    """Candidates (best first) and their (I, R, C) int32 label map: label k + 1 is
    candidate k.  See :func:`extract_candidates` for the arguments."""
    config = config or SegmentConfig()
    check_extraction(config)
    prob = np.asarray(prob)
    hu = np.asarray(hu)
    if prob.ndim != 3 or prob.shape != hu.shape:
        raise ValueError(f"prob {prob.shape} and hu {hu.shape} must be the same 3D shape")
    spacing_irc = geometry.spacing_xyz[::-1].copy()
    labels, count, uneroded = _components(prob > config.threshold, config, spacing_irc)

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
        return [], np.zeros(prob.shape, dtype=np.int32)

    stats = _label_stats(labels, count, prob, hu, config.center_weighting)
    ids = np.arange(1, count + 1)
    # Rank: the score, then the other probability, then size (all descending).
    first, second = ((stats["mean_probability"], stats["max_probability"])
                     if config.score == "mean" else
                     (stats["max_probability"], stats["mean_probability"]))
    order = ids[np.lexsort((ids, -stats["voxels"][ids], -second[ids], -first[ids]))]
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
            max_probability=float(stats["max_probability"][label]),
            mean_probability=float(stats["mean_probability"][label]),
            score=float(first[label]),
            mean_hu=float(stats["mean_hu"][label]),
            slice_span=(int(low[0]), int(high[0])),
            bbox_irc=tuple(int(v) for v in (*low, *high)),
            uneroded=bool(uneroded[label]),
        ))
    # Renumber so that label k + 1 is candidates[k].
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[order] = np.arange(1, count + 1, dtype=np.int32)
    return candidates, lut[labels]


def extract_candidates(prob: np.ndarray, hu: np.ndarray, geometry: Geometry,
                       config: SegmentConfig | None = None, *,
                       lung_mask: np.ndarray | None = None,
                       series_uid: str = "") -> list[Candidate]:
    """Nodule candidates from a probability volume, best first.

    prob : (I, R, C) float probabilities; hu : (I, R, C) HU of the same scan.
    ``lung_mask`` (I, R, C) bool keeps only components touching it; without it,
    ``config.lung_mask`` computes one with :func:`lunaseg.masks.lung_mask`.  See the module
    docstring for threshold, erosion, connectivity and centre conventions.
    """
    return label_candidates(prob, hu, geometry, config, lung_mask=lung_mask,
                            series_uid=series_uid)[0]
