"""Voxel masks: nodule masks from annotation centres and a coarse lung mask.

Annotations give a centre and a diameter; training needs voxels.  The default is the book's
heuristic, made edge-safe: grow a radius per axis from the centre while both sides stay
denser than ``threshold_hu``, fill the box, keep only the dense voxels inside it.

Class masks (chapter exercise 3) label each nodule voxel with its nodule's class, benign
(LUNA's ``mal_bool`` False) or malignant (True), as :mod:`lunaseg.luna` numbers them.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from lunaseg.config import MaskConfig
from lunaseg.geometry import Geometry
from lunaseg.luna import BENIGN, nodule_class

__all__ = ["nodule_radii_irc", "annotation_mask", "annotation_classes", "classes_by_nearest",
           "positive_slices", "lung_mask", "resolve_lung_mask", "body_box", "bounding_box"]

BODY_HU = -500.0  # anything denser is body, table or bone
BODY_MARGIN_PX = 8


def _grow_radius(line_hu: np.ndarray, center: int, threshold_hu: float, start: int) -> int:
    """The book's radius along one axis, made safe at the volume edge.

    The book steps outward while the voxels at +r and -r are both denser than the threshold
    and returns the first r where either is not.  Past the end of the array it returned r - 1
    (its IndexError branch) and before the start it silently wrapped around (a negative index),
    so nodules near slice 0 got wrong boxes.  Here a side that has left the volume no longer
    votes: the nodule may continue beyond the scan, so the side still inside decides, and
    growth ends once both sides are outside.  Away from the edges this is the book's rule.
    """
    radius = start
    size = line_hu.shape[0]
    while True:
        low, high = center - radius, center + radius
        inside = [line_hu[i] for i in (low, high) if 0 <= i < size]
        if not inside:
            return radius - 1
        if not all(value > threshold_hu for value in inside):
            return radius
        radius += 1


def nodule_radii_irc(hu: np.ndarray, center_irc: np.ndarray, config: MaskConfig,
                     *, diameter_mm: float | None = None,
                     spacing_irc: np.ndarray | None = None) -> np.ndarray:
    """Box half-sizes (index, row, col) in voxels for one nodule centre."""
    i, r, c = (int(v) for v in center_irc)
    radii = np.array([
        _grow_radius(hu[:, r, c], i, config.threshold_hu, config.min_radius_vox),
        _grow_radius(hu[i, :, c], r, config.threshold_hu, config.min_radius_vox),
        _grow_radius(hu[i, r, :], c, config.threshold_hu, config.min_radius_vox),
    ])
    if config.bound_by_diameter and diameter_mm is not None and spacing_irc is not None:
        # Cap the box at the annotated radius plus one voxel, so a nodule touching a vessel
        # or the pleura does not spread along it.
        cap = np.ceil(diameter_mm / 2.0 / np.asarray(spacing_irc)).astype(int) + 1
        radii = np.minimum(radii, cap)
    return np.maximum(radii, 0)


def _nodule_boxes(hu: np.ndarray, geometry: Geometry, centers_xyz: Iterable[np.ndarray],
                  diameters_mm: Iterable[float], config: MaskConfig):
    """Per nodule, the index of the (i, r, c) box the heuristic grows (clamped to the volume:
    no negative-index wrap-around) and the dense voxels inside it; None for a centre outside
    the volume."""
    shape = np.asarray(hu.shape)
    spacing_irc = geometry.spacing_xyz[::-1]
    for center_xyz, diameter_mm in zip(centers_xyz, diameters_mm):
        center_irc = geometry.xyz_to_irc(np.asarray(center_xyz, dtype=np.float64))
        if np.any(center_irc < 0) or np.any(center_irc >= shape):
            yield None
            continue
        radii = nodule_radii_irc(hu, center_irc, config, diameter_mm=diameter_mm,
                                 spacing_irc=spacing_irc)
        low = np.maximum(center_irc - radii, 0)
        high = np.minimum(center_irc + radii + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        # Only voxels inside a box can be in the mask, so test the threshold there alone.
        yield box, hu[box] > config.threshold_hu


def annotation_mask(hu: np.ndarray, geometry: Geometry,
                    nodules: Iterable[tuple[np.ndarray, float]],
                    config: MaskConfig | None = None) -> np.ndarray:
    """Boolean (I, R, C) mask of all nodules given as ``(center_xyz, diameter_mm)`` pairs.

    Centres outside the volume are ignored (a partial slab may hold half a nodule list).
    """
    nodules = list(nodules)
    boxes = np.zeros(hu.shape, dtype=bool)  # the union of (box & dense) over nodules
    for found in _nodule_boxes(hu, geometry, [n[0] for n in nodules], [n[1] for n in nodules],
                               config or MaskConfig()):
        if found is not None:
            box, dense = found
            boxes[box] |= dense
    return boxes


def annotation_classes(hu: np.ndarray, geometry: Geometry,
                       nodules: Iterable[tuple[np.ndarray, float, bool | None]],
                       config: MaskConfig | None = None) -> np.ndarray:
    """(I, R, C) uint8 class mask of nodules given as ``(center_xyz, diameter_mm,
    is_malignant)``: :func:`annotation_mask`'s voxels, each with its nodule's class.

    Where two nodules' boxes overlap, MALIGNANT wins: a candidate generator must not lose the
    class that matters more.  ``annotation_classes(...) > 0`` equals :func:`annotation_mask`.
    """
    nodules = list(nodules)
    classes = np.zeros(hu.shape, dtype=np.uint8)
    found_boxes = _nodule_boxes(hu, geometry, [n[0] for n in nodules], [n[1] for n in nodules],
                                config or MaskConfig())
    for nodule, found in zip(nodules, found_boxes):
        if found is not None:
            box, dense = found
            classes[box] = np.maximum(classes[box], dense * np.uint8(nodule_class(nodule[2])))
    return classes


def classes_by_nearest(mask: np.ndarray, geometry: Geometry,
                       nodules: Sequence[tuple[np.ndarray, bool | None]]) -> np.ndarray:
    """(I, R, C) uint8 classes of a plain nodule mask: each voxel takes the class of the
    nearest annotated nodule centre (``(center_xyz, is_malignant)`` pairs), in mm.

    For outline masks that carry no class (lunaseg before class masks wrote 0/1 only); with
    no nodule listed every voxel is BENIGN, as an unrated nodule is.
    """
    mask = np.asarray(mask, dtype=bool)
    classes = np.zeros(mask.shape, dtype=np.uint8)
    voxels = np.argwhere(mask)
    if not len(voxels):
        return classes
    if not nodules:
        classes[mask] = BENIGN
        return classes
    centers = np.asarray([n[0] for n in nodules], dtype=np.float64).reshape(-1, 3)
    labels = np.array([nodule_class(n[1]) for n in nodules], dtype=np.uint8)
    voxels_xyz = geometry.irc_to_xyz(voxels.astype(np.float64))
    # Nodules per scan are few (LUNA16: at most a dozen), so a dense distance table is cheap.
    distance = np.linalg.norm(voxels_xyz[:, None, :] - centers[None, :, :], axis=2)
    classes[tuple(voxels.T)] = labels[distance.argmin(axis=1)]
    return classes


def body_box(hu: np.ndarray, *, margin_px: int = BODY_MARGIN_PX) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the in-plane box holding every voxel denser than air on any
    slice, plus a margin.  Outside it there is only air (or scanner padding), so the cache
    and inference can skip it."""
    dense = hu.max(axis=0) > BODY_HU  # a max over slices is cheaper than a 3D compare
    rows = np.flatnonzero(dense.any(axis=1))
    cols = np.flatnonzero(dense.any(axis=0))
    if rows.size == 0:
        return 0, hu.shape[1], 0, hu.shape[2]
    return (max(int(rows[0]) - margin_px, 0), min(int(rows[-1]) + 1 + margin_px, hu.shape[1]),
            max(int(cols[0]) - margin_px, 0), min(int(cols[-1]) + 1 + margin_px, hu.shape[2]))


def positive_slices(mask: np.ndarray) -> np.ndarray:
    """Indices of slices holding at least one mask voxel."""
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def lung_mask(hu: np.ndarray, *, air_hu: float = -400.0,
              spacing_irc: Sequence[float] = (1.0, 1.0, 1.0),
              dilation_mm: float = 5.0, min_fraction: float = 0.02) -> np.ndarray:
    """A simple lung mask: air inside the body, holes filled, dilated in-plane.

    hu : (I, R, C).  Per slice, air-like voxels (< ``air_hu``) connected to the slice's
    border are outside the body (room air, the padding outside the field of view); the
    rest is lung (plus trachea and bowel gas; this mask is coarse on purpose).  Enclosed
    air pieces (3D) under ``min_fraction`` of the largest one are dropped: pockets in the
    back muscles or between the back and the table would otherwise let the spine and the
    table through.  Holes in the lung (vessels, nodules) are filled, then it grows
    ``dilation_mm`` in-plane so nodules on the pleura still touch it.  Working per slice
    keeps a lung that reaches the top or bottom slice inside.  Returns (I, R, C) bool.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    in_plane_8 = np.zeros((3, 3, 3), dtype=bool)
    in_plane_8[1] = True
    in_plane_4 = np.zeros((3, 3, 3), dtype=bool)
    in_plane_4[1] = ndimage.generate_binary_structure(2, 1)

    def touching_border(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(mask, structure)
        outside = np.zeros(count + 1, dtype=bool)
        for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            outside[np.unique(face)] = True
        outside[0] = True  # not part of ``mask`` at all
        return outside[labels]

    air = hu < air_hu
    inside_air = air & ~touching_border(air, in_plane_8)
    if min_fraction > 0 and inside_air.any():
        labels, _ = ndimage.label(inside_air)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        inside_air = (sizes >= min_fraction * sizes.max())[labels]
    # Fill holes: background pieces that do not reach the slice border are enclosed.
    lung = inside_air | ~touching_border(~inside_air, in_plane_4)
    if dilation_mm > 0 and lung.any():
        step = float(min(spacing_irc[1], spacing_irc[2]))
        iterations = max(int(math.ceil(dilation_mm / step)), 1)
        lung = ndimage.binary_dilation(lung, structure=in_plane_4, iterations=iterations)
    return lung


def resolve_lung_mask(given: np.ndarray | None, hu: np.ndarray, spacing_irc: Sequence[float],
                      wanted: bool) -> np.ndarray | None:
    """A given lung mask (checked against ``hu``), else one computed from HU when ``wanted``,
    else None."""
    if given is None:
        return lung_mask(hu, spacing_irc=spacing_irc) if wanted else None
    given = np.asarray(given, dtype=bool)
    if given.shape != np.shape(hu):
        raise ValueError(f"lung_mask has shape {given.shape}, expected {np.shape(hu)}")
    return given


def bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 0) -> tuple[slice, ...] | None:
    """The box (one slice per axis) around a mask's voxels grown ``margin`` voxels on each
    axis and clipped to the array; None when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    box = []
    for axis, size in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(present[0]) - int(margin[axis]), 0),
                         min(int(present[-1]) + 1 + int(margin[axis]), size)))
    return tuple(box)
