"""Synthetic chest-CT phantoms written in LUNA16's exact on-disk layout.

A phantom is an anatomical model, not a texture: body wall (skin, fat, muscle), ribs, spine,
sternum, heart and great vessels, two lungs with textured parenchyma, space-filling vessel
trees that taper from the hilum (the hard negatives: a vessel cut across looks like a nodule),
airways, a scanner table and correlated scanner noise.  Nodules of four kinds and three
locations are placed inside the lungs, with the diameters of LUNA16's annotated nodules, and
reported in LUNA16's CSV formats; their exact voxels are also written as a mask
(``masks/<uid>.mha``, the layout ``lunaseg import-lidc`` uses for reader outlines), so
``prepcache --masks outline`` can train on true shapes and show what the book's HU
heuristic costs.  ``phantom_nodules.csv`` adds each nodule's kind, location and shape to
the annotation columns, so misses can be broken down by them.

Everything is sized relative to the body, and the body relative to the field of view, so a
small (32, 128, 128) volume still shows a whole chest, only at a coarser resolution.  Nodule
diameters stay in millimetres.  Randomness comes only from the ``numpy.random.Generator``
passed in, so a seed reproduces every byte.

Speed matters (a 128x512x512 scan in a few seconds on one core), so the volume is built in
slabs of a few slices: every structure is a closed-form test on precomputed 2D maps and
per-slice profiles, tubes are rasterised only inside their bounding boxes, and sub-voxel
vessels are deposited as partial-volume mass instead of being rasterised.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from lunaseg.config import SynthConfig, check_at_least, check_fraction
from lunaseg.ct import CT, write_image
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry
from lunaseg.luna import (ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, MALIGNANCY_COLUMNS,
                          outline_mask_path, write_csv)

__all__ = [
    "SynthNodule", "Phantom", "SynthSummary", "make_phantom", "synthesize_dataset",
    "make_series_uid", "NODULE_KINDS", "NODULE_LOCATIONS", "MIN_DIAMETER_MM",
    "PHANTOM_NODULE_COLUMNS", "PHANTOM_NODULES_FILE", "PHANTOM_VERSION",
]

log = logging.getLogger(__name__)

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
NODULE_KINDS = ("solid", "part_solid", "ground_glass", "calcified")
NODULE_LOCATIONS = ("isolated", "juxta_pleural", "juxta_vascular")
MIN_DIAMETER_MM = 3.0  # LUNA16 annotates nodules >= 3 mm; smaller ones are "excluded"
# Not a LUNA16 file: the annotation columns plus what each nodule is, for breakdowns of misses.
PHANTOM_NODULES_FILE = "phantom_nodules.csv"
# Bumped whenever the same seed starts giving different files (2: true nodule masks and
# phantom_nodules.csv added; 3: LUNA16's diameters), so a saved dataset from an older
# generator is not reused.
PHANTOM_VERSION = 3
# Quantiles of the diameters of LUNA16's 1,186 annotated nodules (annotations.csv): nodules
# are drawn from this distribution by inverse transform, so a phantom dataset has LUNA16's
# share of each size (4 % under 4 mm, 38 % of 4-6 mm, 34 % of 6-10 mm, 24 % above).
LUNA16_DIAMETER_QUANTILES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                             0.95, 0.98, 1.0)
LUNA16_DIAMETERS_MM = (3.25, 3.83, 4.09, 4.4, 4.9, 5.31, 5.9, 6.43, 7.3, 8.72, 11.07, 15.48,
                       18.95, 22.26, 32.27)
# Overall shares of NODULE_KINDS.  Part-solid and ground-glass nodules are only drawn at
# >= 6 mm and calcified ones at <= 12 mm (a kind is chosen given the diameter, with weights
# that keep these shares), so the kinds never distort the diameter distribution.
KIND_SHARES = (0.62, 0.12, 0.10, 0.16)
SUBSOLID_MIN_MM = 6.0
CALCIFIED_MAX_MM = 12.0
PHANTOM_NODULE_COLUMNS = ANNOTATION_COLUMNS + ("kind", "location", "shape")
AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner reconstructs
BIG_TUBE_MM = 3.5  # vessels and airways wider than this are mediastinal or hilar
# 26 unit directions (cube faces, edges, corners): where a nodule's outline is probed.
_SPHERE_DIRECTIONS = np.array([(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1)
                               for x in (-1, 0, 1) if (z, y, x) != (0, 0, 0)], np.float64)
_SPHERE_DIRECTIONS /= np.linalg.norm(_SPHERE_DIRECTIONS, axis=1, keepdims=True)
SLAB_SLICES = 8  # slices built at once: small enough to stay in cache, big enough to vectorise


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True, eq=False)
class SynthNodule:
    """One synthetic nodule (or tiny excluded finding) in patient coordinates."""

    center_xyz: np.ndarray  # (3,) float64, mm
    diameter_mm: float
    kind: str  # one of NODULE_KINDS
    location: str  # one of NODULE_LOCATIONS
    is_malignant: bool  # LUNA's mal_bool: at least two ratings >= 4
    malignancy_ratings: list[int]  # one rating 1..5 per reader
    shape: str = "round"  # "round", "lobulated" or "spiculated"


@dataclass(eq=False)
class Phantom:
    """A synthetic CT plus its ground truth."""

    hu: np.ndarray  # (I, R, C) int16, Hounsfield units
    geometry: Geometry
    series_uid: str
    nodules: list[SynthNodule]
    excluded: list[SynthNodule]  # nodules < 3 mm: present in the image, never annotated
    lookalike_xyz: np.ndarray  # (M, 3) float64 mm: vessel cuts, bifurcations, airway walls...
    # (I, R, C) bool: voxels at least half inside an annotated nodule (spicules included).
    nodule_mask: np.ndarray | None = None

    def to_ct(self) -> CT:
        """The image part as a ``lunaseg.ct.CT``."""
        return CT(self.hu, self.geometry, self.series_uid)


@dataclass
class SynthSummary:
    """What ``synthesize_dataset`` wrote."""

    out_dir: Path
    series_uids: list[str]
    n_nodules: int
    n_excluded: int
    n_candidates: int
    seconds_per_scan: float


# --------------------------------------------------------------------------- small helpers


def luna16_diameter_mm(quantile: float) -> float:
    """The diameter at ``quantile`` of LUNA16's annotated nodules (linear between table rows)."""
    return float(np.interp(quantile, LUNA16_DIAMETER_QUANTILES, LUNA16_DIAMETERS_MM))


def kind_weights(diameter_mm: float) -> np.ndarray:
    """Probabilities of NODULE_KINDS for a nodule of this size; over LUNA16's sizes they
    average to KIND_SHARES."""
    share_subsolid_size = 1.0 - _luna16_quantile(SUBSOLID_MIN_MM)
    share_calcified_size = _luna16_quantile(CALCIFIED_MAX_MM)
    weights = np.zeros(len(KIND_SHARES))
    if diameter_mm >= SUBSOLID_MIN_MM:
        weights[1:3] = np.array(KIND_SHARES[1:3]) / share_subsolid_size
    if diameter_mm <= CALCIFIED_MAX_MM:
        weights[3] = KIND_SHARES[3] / share_calcified_size
    weights[0] = 1.0 - weights[1:].sum()
    return weights


def _luna16_quantile(diameter_mm: float) -> float:
    return float(np.interp(diameter_mm, LUNA16_DIAMETERS_MM, LUNA16_DIAMETER_QUANTILES))


def make_series_uid(rng: np.random.Generator) -> str:
    """An LIDC-style series UID: the LIDC root plus 30 random digits (no leading zero)."""
    digits = rng.integers(0, 10, size=30)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(str(int(d)) for d in digits)


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _harmonics(rng: np.random.Generator, orders: range, amplitude: float) -> np.ndarray:
    """(K, 3) rows (order, amplitude, phase) for a wobbly outline r(theta)."""
    rows = [(k, rng.normal(0.0, amplitude / k ** 0.5), rng.uniform(0, 2 * np.pi)) for k in orders]
    return np.asarray(rows, dtype=np.float64)


def _superellipse_q(dx, dy, a: float, b: float, power: float, wobble: np.ndarray) -> np.ndarray:
    """Normalised radius: < 1 inside a superellipse with half-axes a, b and a wobbly outline."""
    q = (np.abs(dx / a) ** power + np.abs(dy / b) ** power) ** (1.0 / power)
    theta = np.arctan2(dy, dx)
    scale = 1.0 + sum(amp * np.cos(order * theta + phase) for order, amp, phase in wobble)
    return (q / scale).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma,
                                     mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def _lerp_axis(values: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at fractional grid ``coords``."""
    n = values.shape[axis]
    coords = np.clip(coords, 0.0, n - 1.0)
    lo = np.minimum(np.floor(coords).astype(np.intp), n - 2) if n > 1 else np.zeros(coords.shape,
                                                                                   np.intp)
    frac = (coords - lo).astype(np.float32)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * values.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    a = np.take(values, lo, axis=axis)
    b = np.take(values, hi, axis=axis)
    a += frac * (b - a)
    return a


# --------------------------------------------------------------------------- tubes


@dataclass
class _Tubes:
    """Line segments with radii, in local mm (z, y, x) measured from voxel (0, 0, 0)."""

    p0: np.ndarray  # (S, 3)
    p1: np.ndarray  # (S, 3)
    r0: np.ndarray  # (S,) radius at p0
    r1: np.ndarray  # (S,) radius at p1

    @classmethod
    def empty(cls) -> "_Tubes":
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: list["_Tubes"]) -> "_Tubes":
        parts = [p for p in parts if len(p.r0)]
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.p0 for p in parts]), np.concatenate([p.p1 for p in parts]),
                   np.concatenate([p.r0 for p in parts]), np.concatenate([p.r1 for p in parts]))

    @classmethod
    def polyline(cls, points, radii) -> "_Tubes":
        """Consecutive points joined; ``radii`` per point (linear taper in between)."""
        points = np.asarray(points, np.float64)
        radii = np.broadcast_to(np.asarray(radii, np.float64), (len(points),))
        return cls(points[:-1].copy(), points[1:].copy(), radii[:-1].copy(), radii[1:].copy())

    def __len__(self) -> int:
        return len(self.r0)

    def select(self, keep: np.ndarray) -> "_Tubes":
        return _Tubes(self.p0[keep], self.p1[keep], self.r0[keep], self.r1[keep])

    def scaled_radii(self, factor: float, add_mm: float = 0.0) -> "_Tubes":
        return _Tubes(self.p0, self.p1, self.r0 * factor + add_mm, self.r1 * factor + add_mm)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: which of the (N, 3) points lie inside any tube."""
        if not len(self) or not len(points):
            return np.zeros(len(points), dtype=bool)
        axis = self.p1 - self.p0  # (S, 3)
        length2 = np.maximum((axis ** 2).sum(axis=1), 1e-12)
        rel = points[:, None, :] - self.p0[None]  # (N, S, 3)
        t = np.clip((rel * axis[None]).sum(axis=2) / length2, 0.0, 1.0)
        gap = np.linalg.norm(rel - t[..., None] * axis[None], axis=2)
        return (gap < self.r0 + t * (self.r1 - self.r0)).any(axis=1)


def _subdivide(tubes: _Tubes) -> _Tubes:
    """Cut long segments into pieces about two radii long, so bounding boxes stay tight."""
    if not len(tubes):
        return tubes
    length = np.linalg.norm(tubes.p1 - tubes.p0, axis=1)
    piece = 2.0 * np.maximum(tubes.r0, tubes.r1) + 2.0
    n = np.maximum(np.ceil(length / piece).astype(np.int64), 1)
    seg = np.repeat(np.arange(len(n)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    t0 = (k / n[seg])[:, None]
    t1 = ((k + 1) / n[seg])[:, None]
    vec = tubes.p1 - tubes.p0
    dr = tubes.r1 - tubes.r0
    return _Tubes(tubes.p0[seg] + t0 * vec[seg], tubes.p0[seg] + t1 * vec[seg],
                  tubes.r0[seg] + t0[:, 0] * dr[seg], tubes.r0[seg] + t1[:, 0] * dr[seg])


class _TubeRaster:
    """Rasterises tubes into slabs: exact distance for wide tubes, deposited mass for thin ones.

    Wide tubes: for each voxel of a segment's bounding box, occupancy falls from 1 to 0 over
    one voxel around the surface.  Thin tubes (radius below about a voxel) cannot be drawn
    that way without aliasing, so they deposit their volume (pi r^2 per mm) as partial-volume
    fractions, which is what a scanner records for a sub-voxel vessel.
    """

    def __init__(self, tubes: _Tubes, shape_irc, spacing_irc, *, splat_below_mm: float,
                 max_chunk_voxels: int = 1_500_000) -> None:
        self.shape = tuple(int(n) for n in shape_irc)
        self.spacing = np.asarray(spacing_irc, np.float64)
        self.edge_mm = float(self.spacing[1:].mean())
        self.max_chunk = max_chunk_voxels
        self.z_samples = ((-0.25, 0.25) if self.spacing[0] >= 2.0 * self.spacing[1:].min()
                          else (0.0,))  # thick slices average the tube over their thickness
        rmax = np.maximum(tubes.r0, tubes.r1)
        thin = rmax < splat_below_mm
        self.wide = _subdivide(tubes.select(~thin))
        self._prepare_boxes()
        self._prepare_splats(tubes.select(thin))

    def _prepare_boxes(self) -> None:
        t = self.wide
        reach = np.maximum(t.r0, t.r1)[:, None] + self.edge_mm
        lo_mm = np.minimum(t.p0, t.p1) - reach
        hi_mm = np.maximum(t.p0, t.p1) + reach
        lo = np.ceil(lo_mm / self.spacing).astype(np.int64)
        hi = np.floor(hi_mm / self.spacing).astype(np.int64) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.asarray(self.shape))
        keep = np.all(hi > lo, axis=1)
        self.wide = t.select(keep)
        self.lo, self.hi = lo[keep], hi[keep]

    def _prepare_splats(self, thin: _Tubes) -> None:
        step_mm = 0.6 * float(self.spacing.min())
        vec = thin.p1 - thin.p0
        length = np.linalg.norm(vec, axis=1)
        n = np.maximum(np.ceil(length / step_mm).astype(np.int64), 1)
        seg = np.repeat(np.arange(len(n)), n)
        frac = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + 0.5) / n[seg]
        radius = thin.r0[seg] + frac * (thin.r1 - thin.r0)[seg]
        voxel_mm3 = float(np.prod(self.spacing))
        mass = (np.pi * radius ** 2 * (length / n)[seg] / voxel_mm3).astype(np.float32)
        # Per axis: the lower grid index, and the weights of it and of the next one.
        base, weight = [], []
        # In-plane the mass goes to the nearest voxel: real reconstruction kernels are sharp
        # enough that a 1 mm vessel shows as a crisp one-pixel dot.  Along z it is shared
        # linearly between the two nearest slices (the slice profile).
        for axis in range(3):
            u = (thin.p0[seg, axis] + frac * vec[seg, axis]) / self.spacing[axis]
            if axis:
                b = np.rint(u).astype(np.int64)
                inside = (b >= 0) & (b < self.shape[axis])
                base.append(np.where(inside, b, 0))
                weight.append(inside.astype(np.float32))
                continue
            b = np.floor(u)
            w1 = (u - b).astype(np.float32)
            b = b.astype(np.int64)
            inside0 = (b >= 0) & (b < self.shape[axis])
            inside1 = (b + 1 >= 0) & (b + 1 < self.shape[axis])
            base.append(b)
            weight.append(((1 - w1) * inside0, w1 * inside1))
        flats, weights, slices = [], [], []
        cols = self.shape[2]
        in_plane = base[1] * cols + base[2]
        for oz in (0, 1):
            wt = mass * weight[0][oz] * weight[1] * weight[2]
            ok = wt > 1e-4  # also drops samples outside the volume (their weight is 0)
            flats.append(in_plane[ok])
            slices.append((base[0][ok] + oz).astype(np.int16))
            weights.append(wt[ok])
        slice_of = np.concatenate(slices) if slices else np.zeros(0, np.int16)
        order = np.argsort(slice_of, kind="stable")  # radix sort on int16
        self.splat_slice = slice_of[order]
        self.splat_flat = np.concatenate(flats)[order]
        self.splat_weight = np.concatenate(weights)[order]

    def render(self, k0: int, k1: int) -> np.ndarray:
        """Occupancy in [0, 1] for slices k0..k1-1 as a dense (k1-k0, R, C) float32 array."""
        n, rows, cols = k1 - k0, self.shape[1], self.shape[2]
        occ = np.zeros(n * rows * cols, np.float32)
        a, b = np.searchsorted(self.splat_slice, [k0, k1])
        if b > a:
            local = (self.splat_slice[a:b] - k0).astype(np.int64) * (rows * cols) + \
                self.splat_flat[a:b]
            occ += np.bincount(local, self.splat_weight[a:b], minlength=occ.size).astype(
                np.float32)
        for flat, value in self._wide_voxels(k0, k1):
            np.maximum.at(occ, flat, value)
        np.minimum(occ, 1.0, out=occ)
        return occ.reshape(n, rows, cols)

    def render_sparse(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        """Occupancy of the wide tubes only, as (flat index into the slab, value > 0).

        Far cheaper than a dense slab for small objects (nodules, airways); overlapping
        boxes are merged by taking the largest occupancy per voxel.
        """
        parts = list(self._wide_voxels(k0, k1))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        flat = np.concatenate([f for f, _ in parts])
        value = np.concatenate([v for _, v in parts])
        order = np.lexsort((value, flat))  # by voxel, largest value last
        flat, value = flat[order], value[order]
        last = np.ones(len(flat), bool)
        last[:-1] = flat[1:] != flat[:-1]
        return flat[last], value[last]

    def _wide_voxels(self, k0: int, k1: int):
        if not len(self.wide):
            return
        hit = np.nonzero((self.lo[:, 0] < k1) & (self.hi[:, 0] > k0))[0]
        if not len(hit):
            return
        lo = self.lo[hit].copy()
        hi = self.hi[hit].copy()
        lo[:, 0] = np.maximum(lo[:, 0], k0)
        hi[:, 0] = np.minimum(hi[:, 0], k1)
        counts = np.prod(hi - lo, axis=1)
        start = 0
        while start < len(hit):
            stop = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]),
                                                      self.max_chunk)))
            yield self._rasterise(hit[start:stop], lo[start:stop], hi[start:stop], k0)
            start = stop

    def _rasterise(self, segs: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                   k0: int) -> tuple[np.ndarray, np.ndarray]:
        """Occupancy of every voxel in the boxes ``lo..hi`` of segments ``segs`` (float32)."""
        size = (hi - lo).astype(np.int32)
        counts = np.prod(size.astype(np.int64), axis=1)
        total = int(counts.sum())
        owner = np.repeat(np.arange(len(segs), dtype=np.int32), counts)
        local = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        plane = (size[:, 1] * size[:, 2])[owner]
        di = local // plane
        rem = local - di * plane
        ncol = size[owner, 2]
        dr = rem // ncol
        dc = rem - dr * ncol
        ii = (lo[owner, 0] + di).astype(np.int32)
        rr = (lo[owner, 1] + dr).astype(np.int32)
        cc = (lo[owner, 2] + dc).astype(np.int32)
        t = self.wide
        p0 = t.p0[segs].astype(np.float32)
        vec = (t.p1 - t.p0)[segs].astype(np.float32)
        inv_len2 = (1.0 / np.maximum((vec.astype(np.float64) ** 2).sum(axis=1), 1e-12)
                    ).astype(np.float32)[owner]
        sp = self.spacing.astype(np.float32)
        ry = rr * sp[1] - p0[owner, 1]
        rx = cc * sp[2] - p0[owner, 2]
        vz, vy, vx = vec[owner, 0], vec[owner, 1], vec[owner, 2]
        r0 = t.r0[segs].astype(np.float32)[owner]
        dr_mm = (t.r1 - t.r0)[segs].astype(np.float32)[owner]
        plane_dot = ry * vy + rx * vx
        inv_edge = np.float32(1.0 / self.edge_mm)
        value = np.zeros(total, np.float32)
        for dz in self.z_samples:
            rz = (ii + np.float32(dz)) * sp[0] - p0[owner, 0]
            tt = np.clip((rz * vz + plane_dot) * inv_len2, 0.0, 1.0)
            d2 = (rz - tt * vz) ** 2 + (ry - tt * vy) ** 2 + (rx - tt * vx) ** 2
            occ = ((r0 + tt * dr_mm) - np.sqrt(d2)) * inv_edge + np.float32(0.5)
            value += np.clip(occ, 0.0, 1.0)
        if len(self.z_samples) > 1:
            value *= np.float32(1.0 / len(self.z_samples))
        inside = value > 0
        flat = ((ii[inside] - k0).astype(np.int64) * self.shape[1] + rr[inside]) * self.shape[2] \
            + cc[inside]
        return flat, value[inside]


# --------------------------------------------------------------------------- vessel trees


def _grow_tree(root: np.ndarray, points: np.ndarray, r_term_mm: float,
               rng: np.random.Generator, exponent: float = 1.0 / 3.0) -> tuple[_Tubes, np.ndarray]:
    """A space-filling branching tree from ``root`` to every point of its territory.

    Each branch heads for the centroid of the points it supplies, stops part-way, and its
    territory is split in two across its longest axis for the two daughters.  Radii follow
    a power of the territory (Murray's law: r^3 proportional to it), so vessels taper toward
    the periphery.
    Works one generation at a time over all branches with bincount, never per node.
    Returns the tubes and the bifurcation points.
    """
    n_points = len(points)
    group = np.zeros(n_points, np.int64)
    starts = root[None, :].astype(np.float64)
    p0s, p1s, radii, forks = [], [], [], []
    for _ in range(64):
        n_groups = len(starts)
        if n_groups == 0:
            break
        counts = np.bincount(group, minlength=n_groups).astype(np.float64)
        centroid = np.stack([np.bincount(group, points[:, k], n_groups) for k in range(3)],
                            axis=1) / counts[:, None]
        terminal = counts <= 1
        frac = np.where(terminal, 1.0, rng.uniform(0.3, 0.6, n_groups))
        ends = starts + frac[:, None] * (centroid - starts)
        p0s.append(starts)
        p1s.append(ends)
        radii.append(r_term_mm * counts ** exponent)
        forks.append(ends[~terminal])
        alive = ~terminal[group]
        if not alive.any():
            break
        offset = points - centroid[group]
        cov = np.zeros((n_groups, 3, 3))
        for a in range(3):
            for b in range(a, 3):
                cov[:, a, b] = cov[:, b, a] = np.bincount(group, offset[:, a] * offset[:, b],
                                                          n_groups)
        axis = np.linalg.eigh(cov)[1][:, :, -1]
        side = (np.einsum("ij,ij->i", offset, axis[group]) > 0).astype(np.int64)
        # A split that leaves one side empty (identical points) falls back to index parity.
        left = np.bincount(group, side, n_groups)
        stuck = (left == 0) | (left == counts)
        side = np.where(stuck[group], np.arange(n_points) % 2, side)
        child = 2 * group + side
        child_ids, group = np.unique(child[alive], return_inverse=True)
        points = points[alive]
        n_points = len(points)
        starts = ends[child_ids // 2]
    p0 = np.concatenate(p0s)
    p1 = np.concatenate(p1s)
    radius = np.concatenate(radii)
    # Bend every branch a little at its midpoint: real vessels are never ruler-straight.
    vec = p1 - p0
    length = np.linalg.norm(vec, axis=1, keepdims=True)
    jitter = rng.normal(0.0, 1.0, p0.shape)
    jitter -= np.einsum("ij,ij->i", jitter, vec)[:, None] * vec / np.maximum(length ** 2, 1e-9)
    mid = 0.5 * (p0 + p1) + 0.07 * length * jitter
    tubes = _Tubes(np.concatenate([p0, mid]), np.concatenate([mid, p1]),
                   np.concatenate([radius, radius]), np.concatenate([radius, radius]))
    return tubes, np.concatenate(forks) if forks else np.zeros((0, 3))


# --------------------------------------------------------------------------- anatomy


class _Anatomy:
    """Random anatomy of one patient, in local mm (z, y, x) from voxel (0, 0, 0).

    Every organ is a closed-form test evaluable on a slab grid and at scattered points, so
    the full-resolution image, the coarse lung mask used to place nodules and the points that
    seed the vessel trees all agree.
    """

    def __init__(self, rng: np.random.Generator, shape_irc, spacing_irc) -> None:
        self.shape = tuple(int(n) for n in shape_irc)
        self.spacing = np.asarray(spacing_irc, np.float64)
        extent = self.spacing * np.asarray(self.shape)
        self.extent = extent
        depth_mm, height_mm, width_mm = extent
        # Body: sized to the field of view; every other size scales with it.
        self.a_body = width_mm * rng.uniform(0.44, 0.49)
        self.b_body = min(self.a_body * rng.uniform(0.66, 0.82), 0.37 * height_mm)
        self.scale = self.a_body / 165.0
        s = self.scale
        self.cx = width_mm * (0.5 + rng.uniform(-0.03, 0.03))
        self.cy = height_mm * rng.uniform(0.44, 0.50)
        self.body_power = rng.uniform(2.2, 2.8)
        self.body_wobble = _harmonics(rng, range(2, 6), 0.025)
        # Thoracic cavity (inside the ribs), shifted forward: the back wall is thicker.
        self.a_cav = self.a_body * rng.uniform(0.80, 0.87)
        self.b_cav = self.b_body * rng.uniform(0.74, 0.82)
        self.cy_cav = self.cy - self.b_body * rng.uniform(0.04, 0.09)
        self.cav_power = rng.uniform(2.0, 2.4)
        self.cav_wobble = _harmonics(rng, range(2, 5), 0.015)
        self.y_ant = self.cy_cav - self.b_cav
        self.y_post = self.cy_cav + self.b_cav
        self.x_mid = self.cx + rng.uniform(-4, 4) * s
        # Lungs along z: whole lungs when the volume is tall enough, else a slab of them.
        self.lung_len = rng.uniform(210, 265) * s
        if depth_mm >= self.lung_len + 30 * s:
            self.z_base = rng.uniform(10 * s, depth_mm - self.lung_len - 10 * s)
        else:  # the volume is a slab somewhere between 20% and 85% of the lung height
            lo, hi = 0.20 * self.lung_len, max(0.20 * self.lung_len, 0.85 * self.lung_len
                                               - depth_mm)
            self.z_base = -rng.uniform(lo, hi)
        self.z_top = self.z_base + self.lung_len
        self.apex_len = 0.22 * self.lung_len
        self.dome_mm = rng.uniform(0.10, 0.16) * self.lung_len
        self.dome_left_drop = rng.uniform(0.0, 0.25) * self.dome_mm
        # Mediastinum: a band between the lungs, width (half, mm) against depth t in [0, 1].
        self.med_t = np.array([-0.2, 0.0, 0.12, 0.3, 0.55, 0.8, 1.0, 1.2])
        self.med_w = np.array([3, 4, 7, 20, 22, 15, 18, 30]) * s * rng.uniform(0.85, 1.15)
        # Heart: an ellipsoid on the left of the midline resting on the diaphragm.
        self.heart_c = np.array([self.z_base + self.dome_mm + 0.17 * self.lung_len,
                                 self.y_ant + 0.42 * 2 * self.b_cav,
                                 self.x_mid + rng.uniform(0.12, 0.22) * self.a_cav])
        self.heart_r = np.array([0.2 * self.lung_len, 0.30 * 2 * self.b_cav,
                                 rng.uniform(0.40, 0.48) * self.a_cav])
        self.heart_fat_mm = rng.uniform(2.5, 6) * s
        # Spine: vertebral body bulging into the back of the cavity.
        self.vb_r = rng.uniform(16, 20) * s
        self.vb_y = self.y_post - 0.6 * self.vb_r
        self.vert_pitch = rng.uniform(26, 31) * s
        self.vert_phase = rng.uniform(0, self.vert_pitch)
        # Ribs: tilted hoops, the front end lower than the back.
        self.rib_pitch = self.lung_len * rng.uniform(0.085, 0.095)
        self.rib_drop = self.lung_len * rng.uniform(0.25, 0.35)
        self.rib_first = self.z_top - rng.uniform(0.0, 0.3) * self.rib_pitch
        self.rib_height = rng.uniform(10, 13) * s
        self.rib_depth = rng.uniform(5, 7) * s
        # Tissues.
        contrast = rng.random() < 0.35
        self.blood_hu = rng.uniform(150, 320) if contrast else rng.uniform(32, 50)
        self.fat_hu = rng.uniform(-115, -85)
        self.muscle_hu = rng.uniform(35, 55)
        self.lung_hu = rng.uniform(-920, -895)
        self.lung_gradient_hu = rng.uniform(20, 70)
        self.lung_texture_hu = rng.uniform(6, 14)

    # ----- closed-form organ tests (broadcasting arrays of local mm) -----

    def q_body(self, y, x) -> np.ndarray:
        return _superellipse_q(x - self.cx, y - self.cy, self.a_body, self.b_body,
                               self.body_power, self.body_wobble)

    def q_cav(self, y, x) -> np.ndarray:
        return _superellipse_q(x - self.x_mid, y - self.cy_cav, self.a_cav, self.b_cav,
                               self.cav_power, self.cav_wobble)

    def cav_scale(self, z) -> np.ndarray:
        """Cavity size per slice: 1 in the chest, shrinking to nothing at the lung apex."""
        z = np.asarray(z, np.float64)
        return np.sqrt(np.clip((self.z_top - z) / self.apex_len, 0.0, 1.0)).clip(0.0, 1.0)

    def depth_t(self, y) -> np.ndarray:
        return (np.asarray(y) - self.y_ant) / (self.y_post - self.y_ant)

    def band_halfwidth(self, y) -> np.ndarray:
        return np.interp(self.depth_t(y), self.med_t, self.med_w)

    def diaphragm_z(self, y, x) -> np.ndarray:
        """Height of the diaphragm dome under each (y, x); lungs lie above it."""
        side = np.where(x < self.x_mid, 0.0, 1.0)
        xd = self.x_mid + (side * 2 - 1) * 0.45 * self.a_cav
        rr = ((x - xd) / (0.75 * self.a_cav)) ** 2 + ((y - self.cy_cav) / (1.1 * self.b_cav)) ** 2
        dome = np.sqrt(np.clip(1.0 - rr, 0.0, 1.0))
        return self.z_base + self.dome_mm * dome - side * self.dome_left_drop * dome

    def heart_q(self, z, y, x, grow_mm: float = 0.0) -> np.ndarray:
        r = self.heart_r + grow_mm
        c = self.heart_c
        return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2

    def spine_block(self, y, x) -> np.ndarray:
        dx = x - self.x_mid
        near = dx ** 2 + (y - self.vb_y) ** 2 < (self.vb_r + 4 * self.scale) ** 2
        behind = (y > self.vb_y) & (np.abs(dx) < self.vb_r + 4 * self.scale)
        return near | behind

    def lung_at(self, z, y, x) -> np.ndarray:
        """True where (z, y, x) local mm lies in a lung (broadcasting)."""
        z, y, x = (np.asarray(v, np.float64) for v in (z, y, x))
        inside = self.q_cav(y, x) < self.cav_scale(z)
        inside &= np.abs(x - self.x_mid) >= self.band_halfwidth(y)
        inside &= z > self.diaphragm_z(y, x)
        inside &= self.heart_q(z, y, x, self.heart_fat_mm) >= 1.0
        inside &= ~self.spine_block(y, x)
        return inside

    def hilum(self, side: int) -> np.ndarray:
        """Where the vessels enter lung ``side`` (-1 = patient right, +1 = patient left)."""
        y = self.y_ant + 0.45 * 2 * self.b_cav
        x = self.x_mid + side * (self.band_halfwidth(y) + 2 * self.scale)
        return np.array([self.z_base + 0.55 * self.lung_len, y, x])


# --------------------------------------------------------------------------- the builder


class _PhantomBuilder:
    """Draws one phantom's parameters, then renders it slab by slab."""

    def __init__(self, shape_irc, spacing_irc, rng: np.random.Generator) -> None:
        self.shape = tuple(int(n) for n in shape_irc)
        self.spacing = np.asarray(spacing_irc, np.float64)
        self.rng = rng
        self.anat = _Anatomy(rng, self.shape, self.spacing)
        self.bump_centers: list[np.ndarray] = []
        self.bronchus_points: list[np.ndarray] = []
        n, rows, cols = self.shape
        self.z = np.arange(n) * self.spacing[0]
        self.y = np.arange(rows) * self.spacing[1]
        self.x = np.arange(cols) * self.spacing[2]
        self._coarse_lung()

    # ----- coarse lung mask: seeds vessel trees and places nodules -----

    def _coarse_lung(self) -> None:
        step = max(3.0, float(self.spacing.max()))
        self.coarse_step = step
        axes = [np.arange(step / 2, e, step) for e in self.anat.extent]
        zz, yy, xx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        self.coarse_axes = axes
        self.coarse = self.anat.lung_at(zz, yy, xx)
        padded = np.pad(self.coarse, 1)  # the volume edge is no lung wall: pad then crop
        padded[0], padded[-1] = padded[1], padded[-2]
        self.coarse_edt = ndimage.distance_transform_edt(padded, sampling=step)[1:-1, 1:-1, 1:-1]

    def lung_points(self, count: int, z_margin_mm: float) -> np.ndarray:
        """``count`` uniform random points inside the lungs (local mm), near the volume."""
        a = self.anat
        lo = np.array([max(a.z_base, -z_margin_mm), a.y_ant, a.x_mid - a.a_cav])
        hi = np.array([min(a.z_top, a.extent[0] + z_margin_mm), a.y_post, a.x_mid + a.a_cav])
        found = []
        total = 0
        for _ in range(30):
            cand = lo + self.rng.random((max(count * 3, 64), 3)) * (hi - lo)
            ok = cand[a.lung_at(cand[:, 0], cand[:, 1], cand[:, 2])]
            found.append(ok)
            total += len(ok)
            if total >= count:
                break
        pts = np.concatenate(found)[:count]
        return pts

    # ----- vessels and airways -----

    def build_tubes(self) -> None:
        a, rng, s = self.anat, self.rng, self.anat.scale
        zmax = a.extent[0]
        lung_points_per_ml = rng.uniform(2.5, 3.5)  # terminal vessels per tree per cm^3
        blood, walls, lumens, forks = [], [], [], []
        lung_vol_ml = self.coarse.sum() * self.coarse_step ** 3 / 1000.0
        # Vessel trees need points beyond the slab so branches enter it from outside too.
        margin = 25 * s
        for side in (-1, 1):
            hilum = a.hilum(side)
            for tree, drop in (("artery", 0.0), ("vein", -0.12)):
                n_pts = int(np.clip(lung_points_per_ml * lung_vol_ml / 2, 50, 9000))
                pts = self.lung_points(n_pts * 2, margin)
                pts = pts[(pts[:, 2] - a.x_mid) * side > 0][:n_pts]
                if len(pts) < 4:
                    continue
                root = hilum + np.array([drop * a.lung_len, 0.0, 0.0])
                if tree == "vein":
                    root[1] += 8 * s
                # A law a bit steeper than Murray's keeps mid-sized vessels visible far out.
                tubes, fork = _grow_tree(root, pts, rng.uniform(0.26, 0.33) * s ** 0.5, rng,
                                         exponent=0.35)
                blood.append(tubes)
                blood.append(self._twigs(pts, tubes.r0.min()))
                forks.append(fork)
                if tree == "artery":
                    self._bronchi_along(tubes, side, walls, lumens)
        # Mediastinal vessels: aorta, pulmonary trunk, vena cava, pulmonary veins.
        hc, hr = a.heart_c, a.heart_r
        top = zmax + 40
        arch_z = min(a.z_top - 35 * s, hc[0] + hr[0] + 80 * s)
        asc = [hc[0] + 0.5 * hr[0], hc[1] - 0.2 * hr[1], a.x_mid + 6 * s]
        desc_x = a.x_mid + a.vb_r * 0.9 + 6 * s
        desc_y = a.vb_y - a.vb_r * 1.0
        blood.append(_Tubes.polyline([asc, [arch_z, hc[1] - 0.3 * hr[1], a.x_mid + 4 * s],
                                      [arch_z + 12 * s, desc_y - 25 * s, a.x_mid + 12 * s],
                                      [arch_z, desc_y, desc_x], [-40.0, desc_y, desc_x]],
                                     [14 * s, 15 * s, 13 * s, 12 * s, 12 * s]))
        pa_fork = [a.hilum(1)[0] + 8 * s, a.y_ant + 0.42 * 2 * a.b_cav, a.x_mid + 8 * s]
        blood.append(_Tubes.polyline([[hc[0] + 0.4 * hr[0], hc[1] - 0.45 * hr[1],
                                       hc[2] - 0.1 * hr[2]], pa_fork], 13 * s))
        for side in (-1, 1):
            blood.append(_Tubes.polyline([pa_fork, a.hilum(side)], [11 * s, 9 * s]))
            vein_root = a.hilum(side) + np.array([-0.12 * a.lung_len, 8 * s, 0.0])
            blood.append(_Tubes.polyline([vein_root, [hc[0] + 0.3 * hr[0], hc[1] + 0.5 * hr[1],
                                                      hc[2] - 0.2 * hr[2]]], 7 * s))
        blood.append(_Tubes.polyline([[hc[0] + 0.6 * hr[0], hc[1] - 0.1 * hr[1],
                                       a.x_mid - 22 * s], [top, hc[1] - 0.1 * hr[1],
                                                           a.x_mid - 24 * s]], 10 * s))
        self.blood = _Tubes.concat(blood)
        # Trachea and main bronchi.
        carina = np.array([a.hilum(1)[0] + 22 * s, a.y_ant + 0.62 * 2 * a.b_cav, a.x_mid])
        trachea = _Tubes.polyline([[top, carina[1] - 4 * s, carina[2]], carina], 9 * s)
        mains = [_Tubes.polyline([carina, a.hilum(side) + np.array([6 * s, 6 * s, 0.0])],
                                 [6.5 * s, 5.5 * s]) for side in (-1, 1)]
        airway = _Tubes.concat([trachea, *mains])
        walls.append(airway.scaled_radii(1.0, 1.8 * s))
        lumens.append(airway)
        self.walls = _Tubes.concat(walls)
        self.lumens = _Tubes.concat(lumens)
        # What a nodule must not sink into (see _fits): vessels and airways over 3.5 mm.
        solid = _Tubes.concat([self.blood, self.walls])
        self.big_tubes = solid.select(np.maximum(solid.r0, solid.r1) > BIG_TUBE_MM)
        self.soft_tubes = _Tubes.polyline([[top, a.vb_y - a.vb_r - 9 * s, a.x_mid + 5 * s],
                                           [-40.0, a.vb_y - a.vb_r - 9 * s, a.x_mid + 8 * s]],
                                          7 * s)  # oesophagus
        self.forks = np.concatenate(forks) if forks else np.zeros((0, 3))

    def _twigs(self, tips: np.ndarray, r_tip_mm: float) -> _Tubes:
        """Two short thin branches from every tree tip: the tree below the modelled level.

        On CT these sub-millimetre vessels are the many one-pixel dense specks of the lung.
        """
        rng = self.rng
        start = np.repeat(tips, 2, axis=0)
        direction = rng.normal(size=start.shape)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        end = start + direction * rng.uniform(2.0, 5.0, (len(start), 1)) * self.anat.scale
        inside = self.anat.lung_at(end[:, 0], end[:, 1], end[:, 2])
        radius = np.full(int(inside.sum()), r_tip_mm)
        return _Tubes(start[inside], end[inside], radius, radius * 0.8)

    def _bronchi_along(self, artery: _Tubes, side: int, walls: list, lumens: list) -> None:
        """Bronchi run beside the wider arteries (the bronchovascular bundle), air inside."""
        keep = artery.r0 >= 1.6 * math.sqrt(self.anat.scale)
        seg = artery.select(keep)
        if not len(seg):
            return
        vec = seg.p1 - seg.p0
        length = np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)
        # Offset perpendicular to the vessel, toward the (fixed) posterior-medial side.
        hint = np.array([0.3, 1.0, -0.5 * side])
        perp = hint - (vec @ hint)[:, None] * vec / length ** 2
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-6)
        r_out = seg.r0 * 0.95
        shift = perp * (seg.r0 + r_out + 0.4)[:, None]
        lumen = _Tubes(seg.p0 + shift, seg.p1 + shift, r_out * 0.72, r_out * 0.72)
        wall = _Tubes(seg.p0 + shift, seg.p1 + shift, r_out, r_out)
        walls.append(wall)
        lumens.append(lumen)
        self.bronchus_points.append(0.5 * (wall.p0 + wall.p1) + perp * r_out[:, None])

    # ----- nodules -----

    def place_nodules(self, with_nodules: bool, max_nodules: int, n_nodules: int | None) -> None:
        rng = self.rng
        self.nodule_specs: list[dict] = []
        self.nodules: list[SynthNodule] = []
        self.excluded: list[SynthNodule] = []
        if with_nodules:
            if n_nodules is None:
                weights = 1.0 / np.arange(1, max_nodules + 1)
                n_nodules = int(rng.choice(np.arange(1, max_nodules + 1),
                                           p=weights / weights.sum())) if max_nodules > 0 else 0
            for _ in range(n_nodules):
                spec = self._draw_nodule(tiny=False)
                if spec is not None:
                    spec["annotated"] = True
                    self.nodule_specs.append(spec)
                    self.nodules.append(spec["record"])
        for _ in range(int(rng.integers(0, 3))):
            spec = self._draw_nodule(tiny=True)
            if spec is not None:
                spec["annotated"] = False
                self.nodule_specs.append(spec)
                self.excluded.append(spec["record"])

    def _draw_nodule(self, tiny: bool) -> dict | None:
        rng = self.rng
        if tiny:
            diameter = rng.uniform(1.6, 2.9)
            kind = "calcified" if rng.random() < 0.3 else "solid"
        else:
            diameter = luna16_diameter_mm(rng.random())
            kind = str(rng.choice(NODULE_KINDS, p=kind_weights(diameter)))
        # A nodule wider than the lung would not fit: cap by the deepest lung point.
        diameter = float(min(diameter, 1.6 * self.coarse_edt.max()))
        if diameter < (1.0 if tiny else MIN_DIAMETER_MM):
            return None
        radius = diameter / 2
        location = "isolated" if tiny else str(rng.choice(NODULE_LOCATIONS, p=[0.5, 0.3, 0.2]))
        center = self._nodule_center(radius, location)
        if center is None and location != "isolated":
            location = "isolated"
            center = self._nodule_center(radius, location)
        if center is None:
            return None
        shape = "round"
        if not tiny and kind != "calcified":
            shape = str(rng.choice(["round", "lobulated", "spiculated"], p=[0.5, 0.3, 0.2]))
        ratings = self._ratings(diameter, kind, shape)
        malignant = sum(r >= 4 for r in ratings) >= 2
        record = SynthNodule(center_xyz=self.to_xyz(center), diameter_mm=round(diameter, 3),
                             kind=kind, location=location, is_malignant=malignant,
                             malignancy_ratings=ratings, shape=shape)
        return {"center": center, "radius": radius, "kind": kind, "shape": shape,
                "record": record}

    def _nodule_center(self, radius: float, location: str) -> np.ndarray | None:
        """A centre inside the lung and the volume, touching the wall or a vessel on request."""
        rng, a = self.rng, self.anat
        edt = self.coarse_edt
        margin = np.array([max(self.spacing[0], 0.5 * radius), radius * 0.6, radius * 0.6])
        z_ok = (self.coarse_axes[0] > margin[0]) & (self.coarse_axes[0]
                                                    < a.extent[0] - margin[0] - self.spacing[0])
        if location == "juxta_vascular" and len(self.blood):
            wide = np.nonzero((self.blood.r0 > 0.8) & (self.blood.r0 < 3.5))[0]
            for _ in range(40):
                if not len(wide):
                    break
                k = rng.choice(wide)
                t = rng.random()
                on = self.blood.p0[k] + t * (self.blood.p1[k] - self.blood.p0[k])
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                center = on + direction * (radius + 0.5 * self.blood.r0[k])
                if self._fits(center, radius, 0.6 * radius + 1.0):
                    return center
            return None
        if location == "juxta_pleural":
            band = (edt > 0.55 * radius) & (edt < 0.55 * radius + self.coarse_step)
        else:
            band = edt > radius + 3.0
        band &= z_ok[:, None, None]
        cells = np.argwhere(band)
        for _ in range(30):
            if not len(cells):
                return None
            cell = cells[rng.integers(len(cells))]
            center = np.array([ax[i] for ax, i in zip(self.coarse_axes, cell)])
            center += rng.uniform(-0.5, 0.5, 3) * self.coarse_step * 0.5
            need = 0.3 * radius if location == "juxta_pleural" else radius + 1.0
            if self._fits(center, radius, need):
                return center
        return None

    def _fits(self, center: np.ndarray, radius: float, min_depth_mm: float) -> bool:
        a = self.anat
        inside_volume = np.all(center >= self.spacing * 0.5) and np.all(
            center <= a.extent - self.spacing * 1.5)
        if not inside_volume or not a.lung_at(*center):
            return False
        cell = np.clip(np.floor(center / self.coarse_step).astype(int), 0,
                       np.asarray(self.coarse.shape) - 1)
        if self.coarse_edt[tuple(cell)] < min_depth_mm:
            return False
        for spec in self.nodule_specs:  # nodules do not overlap each other
            if np.linalg.norm(spec["center"] - center) < spec["radius"] + radius + 2.0:
                return False
        # Readers annotate what they can see: at least half of the nodule's outline must be
        # lung, not the heart, the mediastinal vessels or the main airways (the coarse depth
        # test alone let a few nodules sink into them, invisible but still annotated).
        probes = np.vstack([center, center + radius * _SPHERE_DIRECTIONS])
        clear = a.lung_at(probes[:, 0], probes[:, 1], probes[:, 2])
        clear &= ~self.big_tubes.inside(probes)
        return bool(clear[0] and clear[1:].mean() >= 0.5)  # the centre, then the outline

    def _ratings(self, diameter: float, kind: str, shape: str) -> list[int]:
        """Reader ratings 1..5: bigger, irregular and part-solid score higher; calcified low."""
        rng = self.rng
        latent = 1.4 + 0.14 * diameter
        latent += {"round": 0.0, "lobulated": 0.6, "spiculated": 1.2}[shape]
        latent += {"solid": 0.0, "part_solid": 0.8, "ground_glass": 0.2, "calcified": -2.0}[kind]
        readers = 4 if rng.random() < 0.6 else 3
        ratings = np.clip(np.rint(latent + rng.normal(0, 0.7, readers)), 1, 5).astype(int)
        return [int(v) for v in ratings]

    def nodule_tubes(self) -> list[tuple[str, _Tubes, float, bool]]:
        """Each nodule as tubes (spheres = zero-length tubes) with a blend mode, a HU level and
        whether it belongs to an annotated nodule (the truth mask)."""
        rng = self.rng
        out = []
        for spec in self.nodule_specs:
            c, r, kind, shape = spec["center"], spec["radius"], spec["kind"], spec["shape"]
            annotated = spec["annotated"]
            # Never thinner than most of a voxel, so a tiny nodule still shows its centre.
            r_draw = max(r, 0.45 * float(self.spacing.max()))
            centers, radii = [c], [r_draw]
            if shape in ("lobulated", "spiculated"):
                for _ in range(int(rng.integers(2, 6))):
                    d = rng.normal(size=3)
                    d /= np.linalg.norm(d)
                    centers.append(c + d * r * rng.uniform(0.35, 0.6))
                    radii.append(r * rng.uniform(0.4, 0.65))
            body = _Tubes(np.asarray(centers), np.asarray(centers), np.asarray(radii),
                          np.asarray(radii))
            spikes = _Tubes.empty()
            if shape == "spiculated":
                k = int(rng.integers(5, 13))
                d = rng.normal(size=(k, 3))
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                start = c + d * r * 0.8
                end = c + d * r * rng.uniform(1.4, 2.4, (k, 1))
                spikes = _Tubes(start, end, np.full(k, rng.uniform(0.4, 0.8)), np.full(k, 0.15))
            if kind == "solid":
                out.append(("blend", _Tubes.concat([body, spikes]), rng.uniform(25, 60),
                            annotated))
            elif kind == "calcified":
                out.append(("blend", body, rng.uniform(30, 55), annotated))
                core = body.select(np.arange(1)).scaled_radii(rng.uniform(0.5, 1.0))
                out.append(("blend", core, rng.uniform(250, 800), annotated))
            else:
                out.append(("max", _Tubes.concat([body, spikes]), rng.uniform(-520, -330),
                            annotated))
                if kind == "part_solid":
                    core = body.select(np.arange(1)).scaled_radii(rng.uniform(0.3, 0.55))
                    out.append(("blend", core, rng.uniform(10, 50), annotated))
        # Pleural bumps (plaques, scars): soft-tissue caps on the lung wall, hard negatives.
        self.bump_centers = []
        for _ in range(int(rng.integers(1, 6))):
            center = self._nodule_center(rng.uniform(2.0, 4.0), "juxta_pleural")
            if center is None:
                continue
            rad = rng.uniform(1.5, 3.5)
            self.bump_centers.append(center)
            out.append(("blend", _Tubes(center[None], center[None], np.array([rad]),
                                        np.array([rad])), rng.uniform(0, 40), False))
        return out

    # ----- look-alikes -----

    def lookalikes(self) -> np.ndarray:
        """Centres of non-nodule structures a detector may mistake for nodules (local mm)."""
        rng = self.rng
        parts = []
        t = self.blood
        vec = t.p1 - t.p0
        length = np.maximum(np.linalg.norm(vec, axis=1), 1e-6)
        axial = np.abs(vec[:, 0]) / length > 0.5  # run along z: round in an axial slice
        cuts = np.nonzero(axial & (t.r0 >= 0.8) & (t.r0 <= 5.0))[0]
        if len(cuts):
            pick = rng.choice(cuts, size=min(len(cuts), 150), replace=False)
            parts.append(t.p0[pick] + rng.random((len(pick), 1)) * vec[pick])
        if len(self.forks):
            pick = rng.choice(len(self.forks), size=min(len(self.forks), 60), replace=False)
            parts.append(self.forks[pick])
        if self.bronchus_points:
            walls = np.concatenate(self.bronchus_points)
            pick = rng.choice(len(walls), size=min(len(walls), 30), replace=False)
            parts.append(walls[pick])
        if self.bump_centers:
            parts.append(np.asarray(self.bump_centers))
        parts.append(self.lung_points(20, 0.0))
        pts = np.concatenate(parts) if parts else np.zeros((0, 3))
        inside = np.all((pts >= 0) & (pts <= self.anat.extent - self.spacing), axis=1)
        pts = pts[inside]
        keep = self.anat.lung_at(pts[:, 0], pts[:, 1], pts[:, 2]) | self._near_bumps(pts)
        return pts[keep]

    def _near_bumps(self, pts: np.ndarray) -> np.ndarray:
        if not self.bump_centers:
            return np.zeros(len(pts), bool)
        d = np.linalg.norm(pts[:, None, :] - np.asarray(self.bump_centers)[None], axis=2)
        return d.min(axis=1) < 1e-6

    # ----- geometry -----

    def set_geometry(self, origin_xyz: np.ndarray) -> None:
        self.origin_xyz = np.asarray(origin_xyz, np.float64)
        self.geometry = Geometry(self.origin_xyz, self.spacing[::-1].copy(), np.eye(3))

    def to_xyz(self, local_zyx: np.ndarray) -> np.ndarray:
        return self.origin_xyz + np.asarray(local_zyx, np.float64)[..., ::-1]

    # ----- rendering -----

    def _static_maps(self) -> None:
        """2D maps shared by every slice (the body outline and wall do not change along z)."""
        a, rng, s = self.anat, self.rng, self.anat.scale
        rows, cols = self.shape[1:]
        y = self.y[:, None]
        x = self.x[None, :]
        qb = a.q_body(y, x)
        rho_b = np.sqrt((x - a.cx) ** 2 + (y - a.cy) ** 2)
        depth = (1.0 - qb) * rho_b / np.maximum(qb, 1e-3)  # mm below the skin, roughly
        qc = a.q_cav(y, x)
        rho_c = np.sqrt((x - a.x_mid) ** 2 + (y - a.cy_cav) ** 2)
        out_mm = rho_c - rho_c / np.maximum(qc, 1e-3)  # mm outside the cavity wall
        theta = np.arctan2(y - a.cy, x - a.cx)
        # Wall: skin, subcutaneous fat (thicker at the sides and back), muscle with fat planes.
        fat_mm = s * rng.uniform(8, 30) * (1.0 + 0.5 * np.sin(theta) + 0.35 * np.cos(2 * theta)
                                           ) + s * 3 * _smooth_field(rng, (rows, cols), 12)
        planes = _smooth_field(rng, (rows, cols), rng.uniform(5, 9))
        wall = np.full((rows, cols), AIR_HU, np.float32)
        body = qb < 1.0
        wall[body] = a.muscle_hu
        wall[body & (np.abs(planes) < 0.12)] = a.fat_hu + 30  # intermuscular fat planes
        wall[body & (depth < fat_mm + 1.5 * s)] = a.fat_hu
        wall[body & (depth < 1.5 * s)] = 20.0  # skin
        cavity_wall = (out_mm > 0) & (out_mm < 1.5 * s)  # extrapleural fat line
        wall[body & cavity_wall] = a.fat_hu + 20
        # Scanner table: two thin curved shells below the body with foam between them.
        body_bottom = a.cy + a.b_body
        table_top = body_bottom + rng.uniform(1, 6) * s - 0.0008 / s * (x - a.cx) ** 2
        table_top = np.broadcast_to(table_top, (rows, cols))
        below = y - table_top
        half_width = np.abs(x - a.cx) < 1.25 * a.a_body
        shell_hu = rng.uniform(150, 400)
        in_table = half_width & (below > 0) & (below < 38 * s)
        wall[in_table] = np.float32(rng.uniform(-950, -880))
        wall[half_width & (((below > 0) & (below < 2.2 * s))
                           | ((below > 34 * s) & (below < 38 * s)))] = shell_hu
        self.wall2d = wall
        self.qc2d = qc
        self.out_mm2d = out_mm
        self.band_w = a.band_halfwidth(self.y)  # (R,)
        self.absdx = np.abs(self.x - a.x_mid)  # (C,)
        self.dia2d = a.diaphragm_z(y, x).astype(np.float32)
        self.spine2d = a.spine_block(y, x)
        self.heart_e2d = (((y - a.heart_c[1]) / a.heart_r[1]) ** 2
                          + ((x - a.heart_c[2]) / a.heart_r[2]) ** 2).astype(np.float32)
        grown = a.heart_r + a.heart_fat_mm
        self.heart_g2d = (((y - a.heart_c[1]) / grown[1]) ** 2
                          + ((x - a.heart_c[2]) / grown[2]) ** 2).astype(np.float32)
        self.dependent = (a.lung_gradient_hu * _smoothstep(a.depth_t(self.y)) ** 1.5
                          ).astype(np.float32)[:, None]
        self.liver2d = np.where(x < a.x_mid + 25 * s, rng.uniform(50, 65), rng.uniform(35, 50)
                                ).astype(np.float32) + np.zeros((rows, cols), np.float32)
        self._bone_maps(y, x, out_mm)

    def _bone_maps(self, y, x, out_mm) -> None:
        a, rng, s = self.anat, self.rng, self.anat.scale
        # Ribs: a band just outside the cavity; angle from the back sets how far a rib drops.
        phi = np.arctan2(x - a.x_mid, -(y - a.cy_cav))  # 0 = straight back
        away = np.abs(phi) / np.pi  # 0 at the spine, 1 at the sternum
        band = (out_mm > 1.0 * s) & (out_mm < 1.0 * s + a.rib_depth) & (away > 0.06) & (
            away < 0.86)
        self.rib_idx = np.flatnonzero(band)
        self.rib_u = ((out_mm.ravel()[self.rib_idx] - 1.0 * s) / a.rib_depth) * 2 - 1
        drop = (1 - np.cos(np.pi * away.ravel()[self.rib_idx])) / 2
        self.rib_drop = a.rib_drop * drop
        self.rib_cartilage = away.ravel()[self.rib_idx] > 0.74
        self.cortex_hu = rng.uniform(950, 1350)
        self.marrow_hu = rng.uniform(230, 380)
        # Sternum: front midline, just outside the cavity.
        sy = a.y_ant - 7 * s
        st = ((x - a.x_mid) / (15 * s)) ** 4 + ((y - sy) / (6 * s)) ** 4
        self.sternum_bone = st < 1.0
        self.sternum_marrow = st < 0.45
        self.sternum_z = (a.z_base + 0.25 * a.lung_len, a.z_top - 0.02 * a.lung_len)
        # Spine: vertebral body (or disc), canal, neural arch, spinous and transverse processes.
        dx = x - a.x_mid
        dy = y - a.vb_y
        r_vb = np.sqrt(dx ** 2 + dy ** 2)
        canal_y = a.vb_y + a.vb_r + 8 * s
        r_canal = np.sqrt(dx ** 2 + (y - canal_y) ** 2)
        self.vb_body = r_vb < a.vb_r
        self.vb_cortex = self.vb_body & (r_vb > a.vb_r - 1.3 * s)
        self.canal = r_canal < 7.5 * s
        self.arch = (r_canal >= 7.5 * s) & (r_canal < 12.5 * s) & (y > a.vb_y + 0.6 * a.vb_r)
        self.spinous = (np.abs(dx) < 3.0 * s) & (y > canal_y + 10 * s) & (y < canal_y + 30 * s)
        # Transverse processes point sideways and back, toward the rib heads.
        along = (np.abs(dx) * 0.85 + (y - canal_y) * 0.5)
        across = np.abs(-np.abs(dx) * 0.5 + (y - canal_y) * 0.85)
        self.transverse = (across < 3.5 * s) & (along > 9 * s) & (along < 30 * s)
        self.disc_hu = rng.uniform(70, 100)

    def render(self, progress_label: str | None = None) -> np.ndarray:
        a, rng, s = self.anat, self.rng, self.anat.scale
        n, rows, cols = self.shape
        self._static_maps()
        min_px = float(self.spacing[1:].min())
        blood = _TubeRaster(self.blood, self.shape, self.spacing, splat_below_mm=0.9 * min_px)
        soft = _TubeRaster(self.soft_tubes, self.shape, self.spacing, splat_below_mm=0.0)
        walls = _TubeRaster(self.walls, self.shape, self.spacing, splat_below_mm=0.0)
        lumens = _TubeRaster(self.lumens, self.shape, self.spacing, splat_below_mm=0.0)
        nodules = [(mode, _TubeRaster(t, self.shape, self.spacing, splat_below_mm=0.0), hu,
                    annotated) for mode, t, hu, annotated in self.nodule_tubes()]
        self.nodule_mask = np.zeros(self.shape, bool)
        flat_mask = self.nodule_mask.reshape(-1)
        # Low-frequency lung texture on a coarse grid, interpolated per slab.
        step = 7.0 * s
        coarse_shape = tuple(int(e // step) + 3 for e in a.extent)
        texture = _smooth_field(rng, coarse_shape, 1.0)
        noise = _NoiseTiles(rng, rows, cols, sigma_px=rng.uniform(0.6, 0.9))
        noise_hu = float(np.exp(rng.uniform(np.log(15), np.log(55))))
        psf_weight = np.float32(rng.uniform(0.05, 0.12))
        out = np.empty(self.shape, np.int16)
        for k0 in range(0, n, SLAB_SLICES):
            k1 = min(n, k0 + SLAB_SLICES)
            z = self.z[k0:k1]
            slab = self._tissue_slab(z, texture, step)
            flat_slab = slab.reshape(-1)
            self._blend(slab, blood.render(k0, k1), a.blood_hu)
            self._blend_sparse(flat_slab, soft.render_sparse(k0, k1), a.muscle_hu)
            self._blend_sparse(flat_slab, walls.render_sparse(k0, k1), a.muscle_hu - 20)
            self._blend_sparse(flat_slab, lumens.render_sparse(k0, k1), AIR_HU)
            for mode, raster, hu, annotated in nodules:
                index, occupancy = raster.render_sparse(k0, k1)
                self._blend_sparse(flat_slab, (index, occupancy), hu, only_denser=mode == "max")
                if annotated:
                    flat_mask[index[occupancy >= 0.5] + k0 * rows * cols] = True
            self._bones(slab, z)
            _psf(slab, psf_weight)
            for i in range(k1 - k0):
                slab[i] += noise_hu * noise.draw(rng)
            np.clip(np.rint(slab), HU_MIN, HU_MAX, out=slab)
            out[k0:k1] = slab
        # A nodule narrower than a voxel may fill none by half; its centre voxel still counts.
        for spec in self.nodule_specs:
            if not spec["annotated"]:
                continue
            center = np.rint(spec["center"] / self.spacing).astype(int)
            self.nodule_mask[tuple(np.clip(center, 0, np.asarray(self.shape) - 1))] = True
        return out

    @staticmethod
    def _blend(slab: np.ndarray, occ: np.ndarray, hu: float) -> None:
        slab += occ * (np.float32(hu) - slab)

    @staticmethod
    def _blend_sparse(flat_slab: np.ndarray, sparse: tuple[np.ndarray, np.ndarray], hu: float,
                      only_denser: bool = False) -> None:
        """Mix ``hu`` into the voxels a sparse occupancy covers (``only_denser``: never darken)."""
        index, occ = sparse
        if not len(index):
            return
        current = flat_slab[index]
        change = np.float32(hu) - current
        if only_denser:  # ground glass adds density on top of vessels, never removes it
            change = np.maximum(change, 0.0)
        flat_slab[index] = current + occ * change

    def _tissue_slab(self, z: np.ndarray, texture: np.ndarray, step: float) -> np.ndarray:
        a = self.anat
        n = len(z)
        slab = np.repeat(self.wall2d[None], n, axis=0)
        zz = z[:, None, None]
        cavity = self.qc2d[None] < a.cav_scale(z)[:, None, None].astype(np.float32)
        slab[cavity] = a.fat_hu + 15  # mediastinal fat by default
        below = cavity & (zz < self.dia2d[None])
        slab[below] = np.broadcast_to(self.liver2d, slab.shape)[below]
        hz = ((z - a.heart_c[0]) / a.heart_r[0]) ** 2
        heart = cavity & (self.heart_e2d[None] < (1.0 - hz)[:, None, None])
        slab[heart] = a.blood_hu if a.blood_hu < 100 else 45.0
        if a.blood_hu >= 100:  # contrast: bright chambers inside a myocardial wall
            inner = self.heart_e2d[None] < (0.55 - hz)[:, None, None]
            slab[heart & inner] = a.blood_hu
        gz = ((z - a.heart_c[0]) / (a.heart_r[0] + a.heart_fat_mm)) ** 2
        lung = cavity & ~below & ~self.spine2d[None]
        lung &= self.absdx[None, None, :] >= self.band_w[None, :, None]
        lung &= self.heart_g2d[None] >= (1.0 - gz)[:, None, None]
        # Parenchyma: base level, denser toward the back, slow patchy variation.
        tex = _lerp_axis(texture, 0, z / step)
        tex = _lerp_axis(tex, 1, self.y / step)
        tex = _lerp_axis(tex, 2, self.x / step)
        tex *= np.float32(a.lung_texture_hu)
        tex += np.float32(a.lung_hu)
        tex += self.dependent[None]
        np.copyto(slab, tex, where=lung)
        return slab

    def _bones(self, slab: np.ndarray, z: np.ndarray) -> None:
        a = self.anat
        n = len(z)
        flat = slab.reshape(n, -1)
        # Ribs: which hoop each band pixel belongs to in this slice, and where in its section.
        v = (z[:, None] + self.rib_drop[None, :] - (a.rib_first - 11 * a.rib_pitch)) / a.rib_pitch
        k = np.rint(v)
        vert = (v - k) * a.rib_pitch / (a.rib_height / 2)
        e = self.rib_u[None, :] ** 2 + vert ** 2
        bone = (e < 1.0) & (k >= 0) & (k <= 11)
        cortex = e > 0.62
        hu = np.where(cortex, self.cortex_hu, self.marrow_hu)
        hu = np.where(self.rib_cartilage[None, :], 130.0, hu).astype(np.float32)
        cur = flat[:, self.rib_idx]
        flat[:, self.rib_idx] = np.where(bone, hu, cur)
        for i in range(n):
            sl = slab[i]
            zi = z[i]
            if self.sternum_z[0] < zi < self.sternum_z[1]:
                sl[self.sternum_bone] = self.cortex_hu
                sl[self.sternum_marrow] = self.marrow_hu
            phase = ((zi - a.vert_phase) % a.vert_pitch) / a.vert_pitch
            if phase < 0.18:
                sl[self.vb_body] = self.disc_hu
            else:
                sl[self.vb_body] = self.marrow_hu
                sl[self.vb_cortex] = self.cortex_hu
            if 0.25 < phase < 0.85:
                sl[self.arch] = self.cortex_hu
                sl[self.canal] = 25.0
            if 0.35 < phase < 0.75:
                sl[self.spinous] = self.cortex_hu
            if 0.45 < phase < 0.7:
                sl[self.transverse] = self.cortex_hu


def _psf(slab: np.ndarray, weight: np.float32) -> None:
    """The scanner's in-plane blur: a [w, 1-2w, w] kernel along rows and columns, in place."""
    ndimage.correlate1d(slab, [weight, 1 - 2 * weight, weight], axis=2, output=slab,
                        mode="nearest")
    centre = slab[:, 1:-1, :] * (1 - 2 * weight)
    centre += weight * slab[:, :-2, :]
    centre += weight * slab[:, 2:, :]
    slab[:, 1:-1, :] = centre


class _NoiseTiles:
    """Correlated scanner noise: a few pre-made noise planes, cut at random offsets per slice.

    Drawing 33 million Gaussian samples per scan would cost more than the rest of the phantom;
    eight planes shifted at random are indistinguishable from fresh noise for any detector.
    """

    def __init__(self, rng: np.random.Generator, rows: int, cols: int, sigma_px: float,
                 count: int = 8, pad: int = 64) -> None:
        tiles = rng.standard_normal((count, rows + pad, cols + pad)).astype(np.float32)
        for axis in (1, 2):
            ndimage.gaussian_filter1d(tiles, sigma_px, axis=axis, output=tiles, mode="wrap")
        # Scale so the 5x5 local standard deviation (what a reader perceives) is one.
        mean = ndimage.uniform_filter(tiles[0], 5)
        local = np.sqrt(np.maximum(ndimage.uniform_filter(tiles[0] ** 2, 5) - mean ** 2, 0))
        tiles /= max(float(np.median(local)), 1e-6)
        self.tiles, self.rows, self.cols, self.pad = tiles, rows, cols, pad

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.integers(len(self.tiles)))
        dr, dc = (int(v) for v in rng.integers(0, self.pad + 1, 2))
        tile = self.tiles[k, dr:dr + self.rows, dc:dc + self.cols]
        return tile if rng.random() < 0.5 else tile[::-1, ::-1]


# --------------------------------------------------------------------------- public API


def _default_spacing(shape_irc, rng: np.random.Generator) -> np.ndarray:
    """LUNA-like spacing; in-plane from a 320-420 mm field of view so any grid shows a chest."""
    fov_mm = rng.uniform(320.0, 420.0)
    pixel = fov_mm / max(shape_irc[1], shape_irc[2])
    slice_mm = float(rng.choice([0.625, 0.7, 1.0, 1.25, 1.5, 2.0, 2.5],
                                p=[0.1, 0.05, 0.15, 0.25, 0.1, 0.1, 0.25]))
    return np.array([pixel, pixel, slice_mm])


def _check_shape(shape_irc) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in shape_irc)
    except (TypeError, ValueError):
        raise ConfigError(f"shape_irc must be three integers, got {shape_irc!r}") from None
    if len(shape) != 3 or min(shape) < 8 or min(shape[1:]) < 32:
        raise ConfigError(f"shape_irc must be (I, R, C) with I >= 8 and R, C >= 32, got "
                          f"{shape_irc!r}")
    return shape  # type: ignore[return-value]


def make_phantom(shape_irc=(128, 512, 512), *, rng: np.random.Generator,
                 spacing_xyz=None, with_nodules: bool = True, max_nodules: int = 6,
                 n_nodules: int | None = None, series_uid: str | None = None) -> Phantom:
    """One synthetic chest CT with its nodules, tiny excluded nodules and look-alike centres.

    ``spacing_xyz`` defaults to a LUNA-like spacing whose in-plane field of view holds a whole
    chest; ``n_nodules`` fixes the nodule count (otherwise 1..``max_nodules``, fewer more
    likely).  Nodules that do not fit in the lungs inside the volume are dropped.
    """
    shape = _check_shape(shape_irc)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if max_nodules < 0:
        raise ConfigError(f"max_nodules must be >= 0, got {max_nodules}")
    uid = series_uid or make_series_uid(rng)
    if spacing_xyz is None:
        spacing_xyz = _default_spacing(shape, rng)
    spacing_xyz = np.asarray(spacing_xyz, np.float64).reshape(3)
    if np.any(spacing_xyz <= 0):
        raise ConfigError(f"spacing_xyz must be positive, got {spacing_xyz.tolist()}")
    builder = _PhantomBuilder(shape, spacing_xyz[::-1], rng)
    extent_xyz = spacing_xyz * np.asarray(shape[::-1])
    origin_xyz = np.array([-extent_xyz[0] / 2 + rng.uniform(-15, 15),
                           -extent_xyz[1] / 2 + rng.uniform(-25, 5),
                           rng.uniform(-300.0, -100.0)])
    builder.set_geometry(origin_xyz)
    builder.build_tubes()
    builder.place_nodules(with_nodules, max_nodules, n_nodules)
    hu = builder.render()
    lookalike = builder.to_xyz(builder.lookalikes())
    return Phantom(hu=hu, geometry=builder.geometry, series_uid=uid, nodules=builder.nodules,
                   excluded=builder.excluded, lookalike_xyz=lookalike.reshape(-1, 3),
                   nodule_mask=builder.nodule_mask)


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def _nodule_rows(uid: str, nodule: SynthNodule) -> tuple[list, list]:
    x, y, z = (float(v) for v in nodule.center_xyz)
    d = float(nodule.diameter_mm)
    radius = d / 2
    plain = [uid, _fmt(x), _fmt(y), _fmt(z), _fmt(d)]
    ratings = list(nodule.malignancy_ratings)
    detail = [*plain, "True" if nodule.is_malignant else "False", str(ratings),
              _fmt(x - radius), _fmt(y - radius), _fmt(z - radius),
              _fmt(x + radius), _fmt(y + radius), _fmt(z + radius), str(len(ratings))]
    return plain, detail


@dataclass(frozen=True)
class _ScanJob:
    """What one worker needs to build and write one scan."""

    seed: np.random.SeedSequence
    shape_irc: tuple[int, int, int]
    with_nodules: bool
    max_nodules: int
    negative_candidates: int
    out_dir: Path
    subset: str


@dataclass
class _ScanRows:
    """The CSV rows one scan contributes."""

    series_uid: str
    annotations: list
    detailed: list
    described: list
    excluded: list
    candidates: list


def _write_scan(job: _ScanJob) -> _ScanRows:
    """Build one phantom, write its image and nodule mask, return its CSV rows."""
    rng = np.random.default_rng(job.seed)
    phantom = make_phantom(job.shape_irc, rng=rng, with_nodules=job.with_nodules,
                           max_nodules=job.max_nodules)
    uid = phantom.series_uid
    write_image(phantom.hu, phantom.geometry, job.out_dir / job.subset / f"{uid}.mhd")
    write_image(phantom.nodule_mask.astype(np.uint8), phantom.geometry,
                outline_mask_path(job.out_dir, uid), compress=True)
    rows = _ScanRows(uid, [], [], [], [], [])
    for nodule in phantom.nodules:
        plain, detail = _nodule_rows(uid, nodule)
        rows.annotations.append(plain)
        rows.detailed.append(detail)
        rows.described.append([*plain, nodule.kind, nodule.location, nodule.shape])
        rows.candidates.append([*plain[:4], 1])
    for nodule in phantom.excluded:
        rows.excluded.append(_nodule_rows(uid, nodule)[0])
    lookalike = phantom.lookalike_xyz
    count = min(len(lookalike), job.negative_candidates)
    pick = np.sort(rng.choice(len(lookalike), size=count, replace=False)) if count else []
    rows.candidates += [[uid, *(_fmt(v) for v in lookalike[i]), 0] for i in pick]
    log.debug("%s: %d nodules, %d excluded, %d candidates", uid, len(phantom.nodules),
              len(phantom.excluded), len(rows.candidates))
    return rows


def synthesize_dataset(out_dir, config: SynthConfig, *, progress: bool = True) -> SynthSummary:
    """Write ``config.series`` phantoms, their nodule masks, LUNA16's four CSVs and
    ``phantom_nodules.csv`` (what each annotated nodule is).

    Scan k goes to ``subset{k % config.subsets}``, its mask to ``masks/<uid>.mha``; the same
    config writes byte-identical files, whatever ``config.workers``.  The summary's
    ``seconds_per_scan`` is per process (wall time x workers / scans).
    """
    from tqdm import tqdm  # imported here so importing lunaseg.synth stays light

    check_at_least(config, "series", 1)
    check_at_least(config, "subsets", 1)
    check_at_least(config, "workers", 0, " (0 = all CPUs)")
    check_at_least(config, "seed", 0)
    check_fraction(config, "no_nodule_fraction")
    shape = _check_shape(config.shape_irc)
    out_dir = Path(out_dir)
    # New scans beside old ones would leave the old ones out of the new CSVs, where training
    # would take their nodules for clean lung.
    existing = sorted(out_dir.glob("subset*/*.mhd"))
    if existing:
        raise DataError(f"{out_dir}: already holds a dataset ({len(existing)} scans); choose "
                        f"an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # One independent stream for the plan and one per scan: scan k is the same whatever the
    # number of scans after it.
    streams = np.random.SeedSequence(int(config.seed)).spawn(config.series + 1)
    plan_rng, children = np.random.default_rng(streams[0]), streams[1:]
    # Exactly round(fraction * series) scans without nodules, chosen at random.
    n_empty = int(round(config.no_nodule_fraction * config.series))
    empty = set(plan_rng.permutation(config.series)[:n_empty].tolist())
    jobs = [_ScanJob(children[k], shape, k not in empty, config.max_nodules,
                     int(config.negative_candidates_per_scan), out_dir,
                     f"subset{k % config.subsets}") for k in range(config.series)]
    workers = max(1, min(config.workers or os.cpu_count() or 1, config.series))
    started = time.perf_counter()
    scans: list[_ScanRows] = []
    bar = tqdm(total=config.series, desc="synth", unit="scan", disable=not progress)
    if workers == 1:
        for job in jobs:
            scans.append(_write_scan(job))
            bar.update()
    else:
        # Each scan has its own random stream, so the pool writes the same bytes as one
        # process; results come back in scan order.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for scan in pool.map(_write_scan, jobs):
                scans.append(scan)
                bar.update()
    bar.close()
    annotations, detailed, described, excluded, candidates, uids = [], [], [], [], [], []
    for scan in scans:
        uids.append(scan.series_uid)
        annotations += scan.annotations
        detailed += scan.detailed
        described += scan.described
        excluded += scan.excluded
        candidates.append((scan.series_uid, scan.candidates))
    seconds = (time.perf_counter() - started) * workers / config.series
    candidates.sort(key=lambda item: item[0])  # LUNA's candidates.csv is sorted by series
    candidate_rows = [row for _, rows in candidates for row in rows]
    write_csv(out_dir / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(out_dir / "annotations_with_malignancy.csv", MALIGNANCY_COLUMNS, detailed)
    write_csv(out_dir / "annotations_excluded.csv", ANNOTATION_COLUMNS, excluded)
    write_csv(out_dir / "candidates.csv", CANDIDATE_COLUMNS, candidate_rows)
    write_csv(out_dir / PHANTOM_NODULES_FILE, PHANTOM_NODULE_COLUMNS, described)
    log.info("wrote %d synthetic scans (%d nodules, %d excluded) to %s in %.2f s per scan "
             "and process",
             config.series, len(annotations), len(excluded), out_dir, seconds)
    return SynthSummary(out_dir=out_dir, series_uids=uids, n_nodules=len(annotations),
                        n_excluded=len(excluded), n_candidates=len(candidate_rows),
                        seconds_per_scan=seconds)
