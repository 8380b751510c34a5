"""Tubes: line segments with radii, their rasteriser and the space-filling tree growth.

Vessels, airways, nodules (a sphere is a zero-length tube) and pleural bumps are all drawn as
tubes in local mm (z, y, x); nothing here knows about anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
