"""How a CT becomes model input: the input spec a checkpoint carries, and the helpers that
apply it (HU window, context-slice stacks, padding to the U-Net's size multiple).

Training, validation, ``segment``, ``evaluate --model`` and the classifier all build their
input through this module from the spec saved with the model, so a model trained with
another HU window or context is fed what it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from lunaseg.errors import ConfigError

__all__ = ["CANONICAL_ORIENTATION", "GROUPINGS", "TTA_RULES", "RESAMPLE_TOLERANCE",
           "SegmentationSpec", "resample_pixel_mm", "resize_slices",
           "ClassifierSpec",
           "context_indices", "context_stack", "pad_to_multiple", "clip_hu", "size_multiple",
           "reach_px", "carried_spec"]

# How far (relative) a scan's pixels may differ from the model's training pixels before
# segment resamples it: a network trained at one scale reads vessels shown twice as wide as
# nodules (docs/results.md), while a spread like its own training scans' it has learnt.
RESAMPLE_TOLERANCE = 0.15

# The voxel order every model sees: array axes (col, row, index) pointing to the patient's
# Left, Posterior and Superior, i.e. an identity direction matrix, as LUNA16 stores its scans.
CANONICAL_ORIENTATION = "LPS"


# How candidates are grouped from a model's voxels and ranked (lunaseg.candidates):
# "lunaseg" keeps components one erosion would erase, measures each on its segmented voxels
# and ranks by its mean logit; "book" drops them, measures the eroded cores and ranks by the
# highest logit, as the book's code does (with logits instead of saturated probabilities).
GROUPINGS = ("lunaseg", "book")
# How mirrored views combine (lunaseg.predict): their lowest logit, or their mean.
TTA_RULES = ("consensus", "mean")


def size_multiple(depth: int) -> int:
    """Input height and width of a padded U-Net of ``depth`` levels must be multiples of this
    (each level but the last halves them)."""
    return 2 ** (depth - 1)


def reach_px(depth: int) -> int:
    """How many pixels away, in-plane, an input pixel can still change an output pixel of a
    padded U-Net of ``depth`` levels (3x3 convs, 2x2 pooling), rounded up to its size
    multiple: two convs per level on the way down and up, one pooling per level."""
    down = 2 * (2 ** depth - 1)
    up = 2 * (2 ** (depth - 1) - 1)
    pools = 2 ** (depth - 1) - 1
    multiple = size_multiple(depth)
    return -(-(down + up + pools) // multiple) * multiple


def _spec_from_dict(cls: type, data: dict) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    spec = cls(**values)
    spec.check()
    return spec


@dataclass(frozen=True)
class SegmentationSpec:
    """What a segmentation model takes and how its output is read: each slice with
    ``context_slices`` slices on either side as channels, HU clipped to [min_hu, max_hu],
    height and width padded to a multiple of ``size_multiple`` (an input pixel reaches
    output pixels ``reach_px`` away), voxels in ``orientation`` order; ``tta`` mirrored
    views, the ``tta_rule`` that combines them and the candidate ``grouping`` it was
    validated with (what ``segment`` uses unless told otherwise); ``pixel_mm`` the in-plane
    pixel spacing of its training scans (median), to which ``segment`` resamples a scan whose
    pixels are more than :data:`RESAMPLE_TOLERANCE` finer or coarser (None: never, as for the
    book's model, trained on LUNA16's own pixels)."""

    min_hu: float = -1000.0
    max_hu: float = 1000.0
    context_slices: int = 3
    size_multiple: int = 4
    reach_px: int = 24
    orientation: str = CANONICAL_ORIENTATION
    tta: int = 4
    tta_rule: str = "mean"
    grouping: str = "lunaseg"
    pixel_mm: float | None = None

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1

    def check(self) -> None:
        if not self.max_hu > self.min_hu:
            raise ConfigError(f"input spec: need min_hu < max_hu, got {self.min_hu}, "
                              f"{self.max_hu}")
        if self.context_slices < 0 or self.size_multiple < 1:
            raise ConfigError(f"input spec: context_slices must be >= 0 and size_multiple "
                              f">= 1, got {self.context_slices}, {self.size_multiple}")
        if self.tta not in (1, 2, 4):
            raise ConfigError(f"input spec: tta must be 1, 2 or 4, got {self.tta}")
        if self.tta_rule not in TTA_RULES:
            raise ConfigError(f"input spec: tta_rule must be one of {', '.join(TTA_RULES)}, "
                              f"got {self.tta_rule!r}")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"input spec: grouping must be one of {', '.join(GROUPINGS)}, "
                              f"got {self.grouping!r}")
        if self.pixel_mm is not None and not self.pixel_mm > 0:
            raise ConfigError(f"input spec: pixel_mm must be positive, got {self.pixel_mm}")
        if self.reach_px < 0 or self.reach_px % self.size_multiple:
            raise ConfigError(f"input spec: reach_px must be a multiple of size_multiple, "
                              f"got {self.reach_px}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentationSpec":
        return _spec_from_dict(cls, data)


@dataclass(frozen=True)
class ClassifierSpec:
    """What a candidate classifier takes: one (index, row, col) crop of ``crop_irc`` voxels
    centred on the candidate, HU clipped to [min_hu, max_hu], in ``orientation`` order;
    ``pixel_mm`` as for :class:`SegmentationSpec` (crops of a scan with other pixels are cut
    wider or narrower and resized to it)."""

    min_hu: float = -1000.0
    max_hu: float = 1000.0
    crop_irc: tuple[int, int, int] = (32, 48, 48)
    orientation: str = CANONICAL_ORIENTATION
    pixel_mm: float | None = None

    def check(self) -> None:
        if not self.max_hu > self.min_hu:
            raise ConfigError(f"input spec: need min_hu < max_hu, got {self.min_hu}, "
                              f"{self.max_hu}")
        if len(self.crop_irc) != 3 or min(self.crop_irc) < 1:
            raise ConfigError(f"input spec: crop_irc must be 3 sizes >= 1, got {self.crop_irc}")
        if self.pixel_mm is not None and not self.pixel_mm > 0:
            raise ConfigError(f"input spec: pixel_mm must be positive, got {self.pixel_mm}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["crop_irc"] = list(self.crop_irc)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierSpec":
        return _spec_from_dict(cls, data)


def carried_spec(model: Any, spec: Any, kind: type, what: str = "input spec") -> Any:
    """``spec``, else the ``kind`` of spec ``model`` carries (lunaseg's models have their
    checkpoint's); a ConfigError when it carries none."""
    if spec is not None:
        return spec
    carried = getattr(model, "spec", None)
    if not isinstance(carried, kind):
        raise ConfigError(f"{type(model).__name__} carries no {what}; pass spec=")
    return carried


def resample_pixel_mm(spec: Any, spacing_rc: Sequence[float] | None) -> float | None:
    """The in-plane pixel (mm) a scan of ``spacing_rc`` (row, column mm) must be resampled to
    for the model of ``spec`` (a segmentation or classifier spec), or None when it is fed as
    it is."""
    if spec.pixel_mm is None or spacing_rc is None:
        return None
    ratios = np.asarray(spacing_rc, dtype=np.float64) / spec.pixel_mm
    if np.all(np.abs(ratios - 1.0) <= RESAMPLE_TOLERANCE):
        return None
    return float(spec.pixel_mm)


def resize_slices(volume: np.ndarray, size_rc: Sequence[int]) -> np.ndarray:
    """Every slice of a (..., R, C) array resized to ``size_rc``, bilinear, pixel edges kept
    aligned (antialiased when shrinking), float32: how a scan reaches the pixels its model
    was trained at, and the network's output comes back."""
    shape = volume.shape
    if tuple(shape[-2:]) == tuple(size_rc):
        return np.asarray(volume, dtype=np.float32)
    flat = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(
        -1, 1, *shape[-2:])
    shrink = size_rc[0] < shape[-2] or size_rc[1] < shape[-1]
    out = torch.cat([torch.nn.functional.interpolate(
        part, size=tuple(size_rc), mode="bilinear", align_corners=False, antialias=shrink)
        for part in flat.split(64)])  # a few slices at a time: bounded memory
    return out.reshape(*shape[:-2], *size_rc).numpy()


def context_indices(n_slices: int, slice_indices: Sequence[int] | np.ndarray,
                    context_slices: int) -> np.ndarray:
    """(N, 2c+1) int64 slice indices of each slice's stack; beyond the volume the first or
    last slice repeats."""
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if context_slices < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    centre = np.asarray(slice_indices, dtype=np.int64).reshape(-1, 1)
    offsets = np.arange(-context_slices, context_slices + 1, dtype=np.int64).reshape(1, -1)
    return np.clip(centre + offsets, 0, n_slices - 1)


def context_stack(hu: np.ndarray, slice_indices: Sequence[int] | np.ndarray,
                  context_slices: int) -> np.ndarray:
    """(N, 2c+1, R, C) stacks of a (I, R, C) volume, in its dtype (no clipping): channel c
    is the slice itself, those before and after it the slices below and above."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    return np.take(hu, context_indices(hu.shape[0], slice_indices, context_slices), axis=0)


def clip_hu(array: np.ndarray, spec: SegmentationSpec | ClassifierSpec) -> np.ndarray:
    """``array`` clipped to the spec's HU window, as float32."""
    return np.clip(array, spec.min_hu, spec.max_hu).astype(np.float32, copy=False)


def pad_to_multiple(array: np.ndarray, multiple: int, fill: float | int) -> np.ndarray:
    """Pad the last two axes at the bottom/right up to a multiple of ``multiple``."""
    height, width = array.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, constant_values=fill)
