"""Full-CT inference and nodule candidates (``lunaseg segment``, SPEC §11, §12).

Pipeline per scan: every slice with its context slices -> U-Net probabilities (I, R, C) ->
threshold -> binary erosion -> 3D connected components -> one :class:`Candidate` per
component, with its centre in voxel and patient coordinates, size and probability.

Decisions (and how they differ from the book):

* Foreground is ``probability > threshold`` (strictly greater, as the book).
* Erosion (6-neighbour cross, ``erosion_iterations`` times) separates blobs that touch.
  The volume's edge does not erode (``border_value=1``): a nodule cut by the first or last
  slice is not thinner than the part we can see.  Components that erosion would erase
  entirely are kept un-eroded (``SegmentConfig.keep_vanished``, flagged ``uneroded``): at
  2.5 mm slices a 3-5 mm nodule is 1-2 slices thick and one 3D erosion deletes it, which
  the book's pipeline does (one of its unrecoverable misses).  After erosion each surviving
  core is grown back over its original thresholded voxels (a voxel shared by several cores
  goes to the nearest one, in mm), so voxel counts and diameters measure what the model
  segmented, not the eroded core.
* Connected components use 6-connectivity by default (scipy's and the book's choice): it
  merges fewer neighbouring structures than 26-connectivity, and merging loses nodules
  while splitting only adds a false positive.  ``SegmentConfig.connectivity = 26`` is there.
* Centre: the centre of mass weighted by probability.  The book weights by HU (clipped to
  [-1000, 1000] plus 1001), so a dense neighbour the model barely marks, such as the pleura
  or a vessel wall, pulls a small nodule's centre outside its radius; ``center_weighting``
  = "hu" restores that, "uniform" weighs every voxel alike.  ``center_xyz`` =
  ``Geometry.irc_to_xyz`` of that (continuous) voxel position, which is right for any
  direction matrix.
* Diameter: of the sphere with the component's physical volume
  (voxels * |det(direction)| * prod(spacing)).
* Test-time augmentation (``SegmentConfig.tta``, off by default): the probability is the
  mean over mirrored copies of each slice, each mirrored back.  A model trained with flips
  should not care; where it does, the blob is one it is unsure of, and the mean votes it
  down.  Measured on held-out phantoms, four views halve the candidates per scan at about
  the same sensitivity.
* Ranking score (the submission's ``probability``): the component's maximum probability
  (the book's habit), or its mean with ``SegmentConfig.score = "mean"``.  A trained model
  saturates at p = 1.0 on many blobs, so maxima tie; ties are broken by the other of the
  two, then by size.  Which ranks better depends on the model
  (``benchmarks/bench_candidates.py`` measures both).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from lunaseg.config import SegmentConfig, to_dict
from lunaseg.ct import CT, dicom_series_in, is_image_file, load_ct
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry
from lunaseg.luna import find_series, write_csv
from lunaseg.masks import body_box
from lunaseg.model import resolve_device
from lunaseg.masks import lung_mask as compute_lung_mask
from lunaseg.files import write_text_atomic
from lunaseg.report import candidate_png, html_report

__all__ = [
    "Candidate", "SegmentResult", "ScanSource", "ScanOutput",
    "model_context_slices", "context_indices", "context_stack", "predict_volume", "TTA_FLIPS",
    "predict_ct", "LUNG_REGION_MARGIN_MM",
    "extract_candidates", "segment_ct", "find_scans", "segment_inputs",
    "CANDIDATE_CSV_COLUMNS", "SUBMISSION_COLUMNS",
]

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CANDIDATE_CSV_COLUMNS = (
    "rank", "seriesuid", "coordX", "coordY", "coordZ", "probability", "max_probability",
    "mean_probability", "diameter_mm", "volume_mm3", "voxels", "index", "row", "col",
    "first_slice", "last_slice", "mean_hu", "uneroded",
)
_CENTER_WEIGHTINGS = ("hu", "probability", "uniform")
_SCORES = ("mean", "max")


# --------------------------------------------------------------------------- results


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


@dataclass(eq=False)
class SegmentResult:
    """Output of :func:`segment_ct` for one scan."""

    prob: np.ndarray  # (I, R, C) float32 probabilities
    labels: np.ndarray  # (I, R, C) int32: 0 background, k + 1 = candidates[k]
    candidates: list[Candidate]
    seconds: float  # inference + candidate extraction
    context_slices: int = 3
    device: str = "cpu"

    @property
    def mask(self) -> np.ndarray:
        """(I, R, C) uint8: 1 on every candidate's voxels."""
        return (self.labels > 0).astype(np.uint8)


# --------------------------------------------------------------------------- inputs


def _model_in_channels(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels"):
        return int(config.in_channels)
    if hasattr(model, "in_channels"):
        return int(model.in_channels)
    batchnorm = getattr(model, "input_batchnorm", None)
    if isinstance(batchnorm, nn.BatchNorm2d):
        return int(batchnorm.num_features)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


def model_context_slices(model: nn.Module, default: int = 3) -> int:
    """Context slices a model expects: (in_channels - 1) // 2 (``default`` if unknown)."""
    channels = _model_in_channels(model)
    if channels is None:
        return default
    if channels < 1 or channels % 2 == 0:
        raise ConfigError(f"model has {channels} input channels; expected an odd number "
                          "(one slice plus the same number of slices above and below)")
    return (channels - 1) // 2


def _pad_multiple(model: nn.Module) -> int:
    """Height and width must be multiples of 2**(depth - 1) for a padded U-Net."""
    for candidate in (model, getattr(model, "unet", None)):
        depth = getattr(candidate, "depth", None)
        if isinstance(depth, int) and depth >= 1:
            return 2 ** (depth - 1)
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "depth", None), int):
        return 2 ** (config.depth - 1)
    return 4  # the default depth 3


def context_indices(n_slices: int, slice_indices: Sequence[int] | np.ndarray,
                    context_slices: int) -> np.ndarray:
    """(N, 2c+1) int64 slice indices of each slice's stack; beyond the volume repeats the edge."""
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if context_slices < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    centre = np.asarray(slice_indices, dtype=np.int64).reshape(-1, 1)
    offsets = np.arange(-context_slices, context_slices + 1, dtype=np.int64).reshape(1, -1)
    return np.clip(centre + offsets, 0, n_slices - 1)


def context_stack(hu: np.ndarray, slice_indices: Sequence[int] | np.ndarray,
                  context_slices: int = 3, *, min_hu: float = -1000.0,
                  max_hu: float = 1000.0) -> np.ndarray:
    """Model inputs for the given slices of a (I, R, C) HU volume.

    Returns (N, 2c+1, R, C) float32: channel c is the slice itself, channels before and
    after it the slices below and above; HU clipped to [min_hu, max_hu].
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    index = context_indices(hu.shape[0], slice_indices, context_slices)
    stack = np.take(hu, index, axis=0)  # (N, 2c+1, R, C), one gather
    return np.clip(stack, min_hu, max_hu).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- inference


# Mirror views for test-time augmentation, as tensor dims to flip (H = -2, W = -1).
TTA_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    2: ((), (-1,)),
    4: ((), (-1,), (-2,), (-2, -1)),
}


def predict_volume(model: nn.Module, hu: np.ndarray, *, context_slices: int | None = None,
                   batch_size: int = 0, device: str | torch.device = "cpu",
                   amp: bool = False, progress: bool = False, min_hu: float = -1000.0,
                   max_hu: float = 1000.0, crop_to_body: bool = True,
                   tta: int = 1) -> np.ndarray:
    """Probability of "nodule" for every voxel of a (I, R, C) HU volume.

    ``crop_to_body`` runs the model only on the in-plane box that holds the body (see
    :func:`lunaseg.masks.body_box`; typically a third to a half of a 512 x 512 slice is air
    outside it) and reports probability 0 outside.  Other arguments: :func:`_predict`.
    """
    if not crop_to_body or np.asarray(hu).ndim != 3:
        return _predict(model, hu, context_slices=context_slices, batch_size=batch_size,
                        device=device, amp=amp, progress=progress, min_hu=min_hu,
                        max_hu=max_hu, tta=tta)
    row0, row1, col0, col1 = body_box(hu)
    prob = np.zeros(hu.shape, dtype=np.float32)
    prob[:, row0:row1, col0:col1] = _predict(
        model, hu[:, row0:row1, col0:col1], context_slices=context_slices,
        batch_size=batch_size, device=device, amp=amp, progress=progress, min_hu=min_hu,
        max_hu=max_hu, tta=tta)
    return prob


def _check_tta(tta: int) -> None:
    if tta not in TTA_FLIPS:
        raise ConfigError(f"segment.tta must be one of {', '.join(map(str, TTA_FLIPS))}, "
                          f"got {tta}")


def _forward_views(model: nn.Module, batch: torch.Tensor, tta: int) -> torch.Tensor:
    """The model's output averaged over the ``tta`` mirror views of ``batch``."""
    if tta == 1:
        return model(batch)
    total = None
    for dims in TTA_FLIPS[tta]:
        output = (model(batch.flip(dims)).flip(dims) if dims else model(batch)).float()
        total = output if total is None else total + output  # summed in float32, not bf16
    return total / tta


def _predict(model: nn.Module, hu: np.ndarray, *, context_slices: int | None,
             batch_size: int, device: str | torch.device, amp: bool, progress: bool,
             min_hu: float, max_hu: float, tta: int = 1) -> np.ndarray:
    """Probability of "nodule" for every voxel of a (I, R, C) HU volume.

    Every slice is fed with ``context_slices`` slices on each side (None: from the model's
    input channels).  Any in-plane size works: the slices are padded with ``min_hu`` (air)
    up to the U-Net's multiple and the output is cropped back.  ``amp`` turns on bf16
    autocast on CUDA (ignored on CPU); ``batch_size`` 0 picks one for the device; ``tta``
    averages 1, 2 or 4 mirror views (:data:`TTA_FLIPS`).  The model is moved to ``device``
    (channels_last) and run in eval mode (its previous mode is restored).
    Returns (I, R, C) float32 in [0, 1].
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    if batch_size < 0:
        raise ConfigError(f"segment.batch_size must be >= 0 (0 = auto), got {batch_size}")
    _check_tta(tta)
    if not max_hu > min_hu:
        raise ValueError(f"need min_hu < max_hu, got {min_hu}, {max_hu}")
    device = resolve_device(device)
    if context_slices is None:
        context_slices = model_context_slices(model)
    channels = 2 * context_slices + 1
    n_slices, height, width = hu.shape
    multiple = _pad_multiple(model)
    pad_h, pad_w = (-height) % multiple, (-width) % multiple

    # Clip once for the whole volume.  Integer HU bounds fit int16 exactly, which halves
    # host memory and the upload to a GPU; each batch becomes float32 on the device.
    if hu.dtype.kind in "iu" and float(min_hu).is_integer() and float(max_hu).is_integer() \
            and -32768 <= min_hu and max_hu <= 32767:
        volume = np.clip(hu, int(min_hu), int(max_hu)).astype(np.int16, copy=False)
    else:
        volume = np.clip(hu, min_hu, max_hu).astype(np.float32, copy=False)
    if pad_h or pad_w:
        volume = np.pad(volume, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=min_hu)
    volume_t = torch.from_numpy(np.ascontiguousarray(volume)).to(device)
    index_t = torch.from_numpy(context_indices(n_slices, np.arange(n_slices),
                                               context_slices)).to(device)

    use_amp = bool(amp) and device.type == "cuda"
    if batch_size == 0:
        # On a CPU one slice at a time keeps the activations in cache (measured 2x faster
        # than 16); a GPU wants larger batches.
        batch_size = 1 if device.type == "cpu" else 16
    prob = np.empty(hu.shape, dtype=np.float32)
    # On CPU the model writes straight into the result; on a GPU the result stays there
    # until the end (one transfer, no per-batch synchronisation).
    prob_t = torch.from_numpy(prob) if device.type == "cpu" else \
        torch.empty(hu.shape, dtype=torch.float32, device=device)

    was_training = model.training
    model.to(device)
    model.eval()
    # channels_last suits cuDNN and oneDNN alike (about 1.5x faster on CPU as well).
    model.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    from tqdm import tqdm

    try:
        with torch.inference_mode(), autocast:
            bar = tqdm(total=n_slices, unit="slice", disable=not progress, leave=False,
                       desc="inference")
            for start in range(0, n_slices, batch_size):
                rows = index_t[start:start + batch_size]
                batch = volume_t.index_select(0, rows.reshape(-1))
                batch = batch.view(rows.shape[0], channels, height + pad_h, width + pad_w)
                batch = batch.float()
                batch = batch.contiguous(memory_format=torch.channels_last)
                output = _forward_views(model, batch, tta)
                if output.ndim != 4 or output.shape[0] != rows.shape[0] \
                        or output.shape[-2:] != batch.shape[-2:]:
                    raise ValueError(f"model output has shape {tuple(output.shape)}; expected "
                                     f"({rows.shape[0]}, 1, {height + pad_h}, {width + pad_w})")
                prob_t[start:start + rows.shape[0]] = output[:, 0, :height, :width].float()
                bar.update(rows.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    if device.type != "cpu":
        prob = prob_t.cpu().numpy()
    return prob


# --------------------------------------------------------------------------- candidates


def _check_segment_config(config: SegmentConfig) -> None:
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
    if config.max_candidates < 1:
        raise ConfigError(f"segment.max_candidates must be >= 1, got {config.max_candidates}")
    if config.batch_size < 0:
        raise ConfigError(f"segment.batch_size must be >= 0 (0 = auto), got "
                          f"{config.batch_size}")
    if config.overlays < 0:
        raise ConfigError(f"segment.overlays must be >= 0, got {config.overlays}")
    _check_tta(config.tta)


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


def _lung_mask(lung_mask: np.ndarray | None, hu: np.ndarray, spacing_irc: Sequence[float],
               wanted: bool) -> np.ndarray | None:
    """A given lung mask (checked against ``hu``), else one computed from HU when ``wanted``."""
    if lung_mask is None:
        return compute_lung_mask(hu, spacing_irc=spacing_irc) if wanted else None
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if lung_mask.shape != np.shape(hu):
        raise ValueError(f"lung_mask has shape {lung_mask.shape}, expected {np.shape(hu)}")
    return lung_mask


def _extract(prob: np.ndarray, hu: np.ndarray, geometry: Geometry, config: SegmentConfig, *,
             lung_mask: np.ndarray | None, series_uid: str
             ) -> tuple[list[Candidate], np.ndarray]:
    _check_segment_config(config)
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
        lung_mask = _lung_mask(lung_mask, hu, spacing_irc, config.lung_mask)
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
    candidates, _ = _extract(prob, hu, geometry, config or SegmentConfig(),
                             lung_mask=lung_mask, series_uid=series_uid)
    return candidates


# The HTML report's table stops here: a model that marks most of the lung (untrained, or
# given a kind of scan it never saw) would otherwise make a page of hundreds of megabytes.
REPORT_MAX_ROWS = 1000

# How far beyond the (already grown) lung mask the network still runs: components may
# stretch this far out of it and keep their full extent, and the chest wall around a pleural
# nodule stays in view.
LUNG_REGION_MARGIN_MM = 20.0


def _lung_region(lung_mask: np.ndarray, spacing_irc: Sequence[float],
                 margin_mm: float = LUNG_REGION_MARGIN_MM) -> tuple[slice, ...] | None:
    """The box around a lung mask, grown ``margin_mm`` on every axis; None when it is empty."""
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if not lung_mask.any():
        return None
    margin = np.ceil(margin_mm / np.asarray(spacing_irc, dtype=float)).astype(int)
    region = []
    for axis, size in enumerate(lung_mask.shape):
        others = tuple(a for a in range(lung_mask.ndim) if a != axis)
        present = np.flatnonzero(lung_mask.any(axis=others))
        region.append(slice(max(int(present[0]) - margin[axis], 0),
                            min(int(present[-1]) + 1 + margin[axis], size)))
    return tuple(region)


def predict_ct(model: nn.Module, ct: CT, config: SegmentConfig | None = None, *,
               device: str | torch.device | None = None, progress: bool = False,
               lung_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probability volume of one CT with ``config``'s views, batch and device.

    With a lung mask (``lung_mask``, or computed when ``config.lung_mask``) only candidates
    touching it are kept, so the network runs only on the box around it grown
    :data:`LUNG_REGION_MARGIN_MM` (not on neck, abdomen or chest wall) and the probability
    is 0 elsewhere.  Returns (probability, the lung mask or None).
    """
    config = config or SegmentConfig()
    _check_segment_config(config)
    device = resolve_device(config.device if device is None else device)
    spacing_irc = ct.geometry.spacing_xyz[::-1]
    lung_mask = _lung_mask(lung_mask, ct.hu, spacing_irc, config.lung_mask)
    region = _lung_region(lung_mask, spacing_irc) if lung_mask is not None else None
    if lung_mask is not None and region is None:
        log.warning("%s: no lung found, so the lung mask keeps no candidate", ct.series_uid)
    box = region if region is not None else (slice(None),) * 3
    prob = np.zeros(ct.hu.shape, dtype=np.float32)
    prob[box] = predict_volume(model, ct.hu[box], context_slices=model_context_slices(model),
                               batch_size=config.batch_size, device=device, amp=config.amp,
                               progress=progress, tta=config.tta)
    return prob, lung_mask


def segment_ct(model: nn.Module, ct: CT, config: SegmentConfig | None = None, *,
               device: str | torch.device | None = None, progress: bool = False,
               lung_mask: np.ndarray | None = None) -> SegmentResult:
    """Probabilities, candidate label map and candidates for one CT.

    ``device`` None uses ``config.device`` ("auto": CUDA when available).
    """
    config = config or SegmentConfig()
    device = resolve_device(config.device if device is None else device)
    start = time.perf_counter()
    prob, lung_mask = predict_ct(model, ct, config, device=device, progress=progress,
                                 lung_mask=lung_mask)
    candidates, labels = _extract(prob, ct.hu, ct.geometry, config, lung_mask=lung_mask,
                                  series_uid=ct.series_uid)
    return SegmentResult(prob, labels, candidates, time.perf_counter() - start,
                         context_slices=model_context_slices(model), device=str(device))


# --------------------------------------------------------------------------- many scans


@dataclass(frozen=True)
class ScanSource:
    """One scan to segment: a file, or a DICOM folder plus the series to read from it."""

    path: Path
    series_uid: str | None = None  # DICOM: the series in the folder; LUNA16: the file's UID
    kind: str = "file"  # "file", "dicom" or "luna"

    @property
    def uid(self) -> str:
        if self.series_uid:
            return self.series_uid
        name = self.path.name
        for suffix in (".nii.gz", ".mhd", ".mha", ".nii", ".nrrd", ".nhdr"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem


@dataclass(frozen=True)
class ScanOutput:
    """What :func:`segment_inputs` wrote for one scan."""

    series_uid: str
    source: Path
    folder: Path
    candidates: int
    seconds: float  # reading + inference + candidates + writing


def _dicom_folders(root: Path) -> list[Path]:
    """Folders below ``root`` (itself included) that hold DICOM series, sorted."""
    found = []
    for folder, _dirs, files in os.walk(root):
        if any(not name.startswith(".") for name in files) and dicom_series_in(folder):
            found.append(Path(folder))
    return sorted(found)


def find_scans(inputs: Sequence[str | os.PathLike],
               series_uids: Iterable[str] | None = None) -> list[ScanSource]:
    """Expand image files, DICOM series folders and LUNA16 roots into scans.

    A folder with ``<uid>.mhd`` files below it is a LUNA16 root; otherwise every folder
    below it that holds DICOM files contributes its series.  ``series_uids`` restricts the
    result (a requested UID that is not found is a warning).
    """
    sources: list[ScanSource] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_file():
            if not is_image_file(path):
                raise DataError(f"{path}: not a CT image (expected a DICOM folder, a LUNA16 "
                                "folder or an .mhd/.mha/.nii/.nii.gz/.nrrd file)")
            sources.append(ScanSource(path))
            continue
        luna = find_series(path)
        if luna:
            sources.extend(ScanSource(p, uid, "luna") for uid, p in sorted(luna.items()))
            continue
        folders = _dicom_folders(path)
        if not folders:
            raise DataError(f"{path}: holds no .mhd files and no DICOM series")
        for folder in folders:
            sources.extend(ScanSource(folder, uid, "dicom")
                           for uid in sorted(dicom_series_in(folder)))
    if series_uids is not None:
        wanted = list(dict.fromkeys(series_uids))
        present = {source.uid for source in sources}
        missing = [uid for uid in wanted if uid not in present]
        if missing:
            log.warning("%d requested series not found in the inputs: %s%s", len(missing),
                        ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
        wanted_set = set(wanted)
        sources = [source for source in sources if source.uid in wanted_set]
    # Image files are named by their stem; files that share one (ct.nii.gz in each patient's
    # folder) are told apart by their folder's name instead of being taken for one scan.
    stems: dict[str, set[Path]] = {}
    for source in sources:
        if source.kind == "file":
            stems.setdefault(source.uid, set()).add(source.path.resolve())
    sources = [ScanSource(source.path, f"{source.path.parent.name}_{source.uid}", "file")
               if source.kind == "file" and len(stems[source.uid]) > 1 else source
               for source in sources]
    unique: dict[str, ScanSource] = {}
    for source in sources:
        if source.uid in unique:
            log.warning("series %s appears twice (%s, %s); using the first", source.uid,
                        unique[source.uid].path, source.path)
            continue
        unique[source.uid] = source
    return list(unique.values())


def _safe_name(uid: str) -> str:
    """A folder name for a series UID (UIDs are digits and dots; file stems may not be)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid).strip(".")
    return cleaned or "scan"


def _candidate_row(candidate: Candidate) -> list:
    x, y, z = candidate.center_xyz
    i, r, c = candidate.center_irc
    return [candidate.rank, candidate.series_uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}",
            f"{candidate.probability:.6f}", f"{candidate.max_probability:.6f}",
            f"{candidate.mean_probability:.6f}",
            f"{candidate.diameter_mm:.3f}", f"{candidate.volume_mm3:.3f}", candidate.voxels,
            f"{i:.3f}", f"{r:.3f}", f"{c:.3f}", candidate.slice_span[0],
            candidate.slice_span[1], f"{candidate.mean_hu:.1f}", int(candidate.uneroded)]


def _write_scan(ct: CT, source: ScanSource, result: SegmentResult, folder: Path,
                config: SegmentConfig, settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if config.write_volumes:
        from lunaseg.ct import write_image

        write_image(result.prob.astype(np.float32, copy=False), ct.geometry,
                    folder / "probability.nii.gz", compress=True)
        write_image(result.mask, ct.geometry, folder / "mask.nii.gz", compress=True)
    write_csv(folder / "candidates.csv", CANDIDATE_CSV_COLUMNS,
              (_candidate_row(c) for c in result.candidates))
    scan_info = {
        "series_uid": ct.series_uid,
        "source": str(source.path),
        "shape_irc": list(ct.shape_irc),
        **ct.geometry.to_dict(),
        "hu_range": [int(ct.hu.min()), int(ct.hu.max())] if ct.hu.size else [],
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "context_slices": result.context_slices,
        "candidates": len(result.candidates),
    }
    document = {**scan_info, "settings": settings,
                "candidates": [c.to_dict() for c in result.candidates]}
    write_text_atomic(json.dumps(document, indent=1) + "\n", folder / "candidates.json")

    # Overlays for the best ``config.overlays`` candidates; stale ones from a previous run
    # with more candidates are removed so the folder matches candidates.csv.
    png_folder = folder / "candidates"
    shown = result.candidates[: config.overlays]
    wanted = {f"cand_{c.rank:03d}.png" for c in shown}
    if png_folder.is_dir():
        for old in png_folder.glob("cand_*.png"):
            if old.name not in wanted:
                old.unlink()
    spacing_irc = ct.geometry.spacing_xyz[::-1]
    thumbnails = []
    for candidate in shown:
        title = (f"#{candidate.rank}  p={candidate.probability:.3f}  "
                 f"d={candidate.diameter_mm:.1f} mm  xyz=({candidate.center_xyz[0]:.1f}, "
                 f"{candidate.center_xyz[1]:.1f}, {candidate.center_xyz[2]:.1f})")
        thumbnails.append(candidate_png(ct.hu, result.labels, candidate.rank + 1,
                                        candidate.center_irc,
                                        png_folder / f"cand_{candidate.rank:03d}.png",
                                        spacing_irc=spacing_irc, title=title))
    columns = ["rank", "probability", "max_probability", "mean_probability", "diameter_mm",
               "voxels", "center_xyz", "center_irc", "slice_span", "mean_hu", "uneroded"]
    rows = []
    for candidate in result.candidates[:REPORT_MAX_ROWS]:
        row = candidate.to_dict()
        row["center_xyz"] = [round(v, 1) for v in candidate.center_xyz]
        row["center_irc"] = [round(v, 1) for v in candidate.center_irc]
        rows.append(row)
    notes = []
    if len(result.candidates) > len(rows):
        notes.append(f"The table lists the first {len(rows):,} of {len(result.candidates):,} "
                     "candidates; candidates.csv holds them all.")
    if len(result.candidates) > len(shown):
        notes.append(f"Views are shown for the first {len(shown)} of "
                     f"{len(result.candidates):,} candidates (SegmentConfig.overlays).")
    note = " ".join(notes)
    html_report(folder / "report.html", title=f"lunaseg candidates: {ct.series_uid}",
                scan_info=scan_info, settings=settings, candidates=rows, columns=columns,
                thumbnails=thumbnails, note=note)


def segment_inputs(inputs: Sequence[str | os.PathLike], model: nn.Module | str | os.PathLike,
                   out_dir: str | os.PathLike, config: SegmentConfig | None = None, *,
                   series_uids: Iterable[str] | None = None,
                   device: str | torch.device | None = None,
                   progress: bool = True) -> list[ScanOutput]:
    """Segment every scan in ``inputs`` and write the results under ``out_dir``.

    ``inputs``: image files, DICOM series folders or LUNA16 roots (see :func:`find_scans`).
    ``model``: a checkpoint path (read with ``lunaseg.model.load_model``) or a module.
    Per scan ``out_dir/<uid>/`` gets probability.nii.gz (float32) and mask.nii.gz (uint8)
    with the scan's geometry, candidates.csv, candidates.json, candidates/cand_NNN.png and
    report.html; ``out_dir/submission.csv`` holds the LUNA16 marks (at most
    ``config.max_candidates`` per scan), rewritten after every scan so an interrupted run
    keeps what it finished.  A scan that cannot be read is skipped with a warning (all
    unreadable: DataError).
    """
    config = config or SegmentConfig()
    _check_segment_config(config)
    device = resolve_device(config.device if device is None else device)
    out_dir = Path(out_dir)
    sources = find_scans(inputs, series_uids)
    if not sources:
        raise DataError("no scans to segment in " + ", ".join(str(p) for p in inputs))
    model_path = None
    if not isinstance(model, nn.Module):
        from lunaseg.model import load_model

        model_path = Path(model)
        model, _checkpoint = load_model(model_path, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**to_dict(config), "model": str(model_path) if model_path else type(model).__name__,
                "device": str(device)}
    write_text_atomic(json.dumps(settings, indent=2) + "\n", out_dir / "segment_config.json")
    log.info("segmenting %d scan(s) on %s into %s", len(sources), device, out_dir)

    from tqdm import tqdm

    submission: list[list] = []
    skipped: list[str] = []
    outputs: list[ScanOutput] = []
    for source in tqdm(sources, unit="scan", disable=not progress, desc="segment"):
        start = time.perf_counter()
        try:
            ct = load_ct(source.path, source.series_uid if source.kind == "dicom" else None)
            if source.kind == "file":
                ct.series_uid = source.uid  # its stem, or folder_stem where stems repeat
        except DataError as error:
            # One unreadable scan must not end a run over hundreds; it is counted and named.
            log.warning("skipped: %s", error)
            skipped.append(source.uid)
            continue
        result = segment_ct(model, ct, config, device=device, progress=progress)
        folder = out_dir / _safe_name(ct.series_uid)
        _write_scan(ct, source, result, folder, config, settings)
        for candidate in result.candidates[: config.max_candidates]:
            x, y, z = candidate.center_xyz
            submission.append([ct.series_uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}",
                               f"{candidate.probability:.6f}"])
        write_csv(out_dir / "submission.csv", SUBMISSION_COLUMNS, submission)
        seconds = time.perf_counter() - start
        log.info("%s: %d candidates, %.1f s (inference + candidates %.1f s)", ct.series_uid,
                 len(result.candidates), seconds, result.seconds)
        if len(result.candidates) > 10 * REPORT_MAX_ROWS:
            log.warning("%s: %d candidates; is the model trained for scans like this one?",
                        ct.series_uid, len(result.candidates))
        outputs.append(ScanOutput(ct.series_uid, source.path, folder, len(result.candidates),
                                  seconds))
    if skipped:
        log.warning("%d of %d scans could not be read and were skipped: %s%s", len(skipped),
                    len(sources), ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
        if not outputs:
            raise DataError(f"none of the {len(sources)} scans could be read (see the warnings)")
    return outputs
