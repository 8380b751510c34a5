"""Vessels and airways: one patient's vessel trees, bronchi, trachea and oesophagus as tubes.

Cut across, a vessel looks like a nodule, so vessels are the hard negatives: the trees grow
from each hilum to points all over the lung and taper toward the periphery as real ones do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lunaseg.synth.anatomy import _Anatomy, _CoarseLung, _lung_points
from lunaseg.synth.tubes import _Tubes, _grow_tree

BIG_TUBE_MM = 3.5  # vessels and airways wider than this are mediastinal or hilar


@dataclass(eq=False)
class _Vessels:
    """One patient's tubes, in local mm (z, y, x)."""

    blood: _Tubes  # lung vessel trees with their twigs, and the mediastinal vessels
    walls: _Tubes  # airway walls (soft tissue)
    lumens: _Tubes  # airway lumens (air)
    soft_tubes: _Tubes  # the oesophagus
    big_tubes: _Tubes  # vessels and airway walls wider than BIG_TUBE_MM
    forks: np.ndarray  # (F, 3) vessel bifurcations
    bronchus_points: list[np.ndarray]  # (B, 3) arrays: points on bronchial walls


def _build_vessels(anat: _Anatomy, lung: _CoarseLung, rng: np.random.Generator) -> _Vessels:
    """Grow the vessel trees of both lungs, the bronchi beside them and the central tubes."""
    a, s = anat, anat.scale
    zmax = a.extent[0]
    lung_points_per_ml = rng.uniform(3.0, 4.2)  # terminal vessels per tree per cm^3
    blood, walls, lumens, forks = [], [], [], []
    bronchus_points: list[np.ndarray] = []
    lung_vol_ml = lung.mask.sum() * lung.step ** 3 / 1000.0
    # Vessel trees need points beyond the slab so branches enter it from outside too.
    margin = 25 * s
    for side in (-1, 1):
        hilum = a.hilum(side)
        for tree, drop in (("artery", 0.0), ("vein", -0.12)):
            n_pts = int(np.clip(lung_points_per_ml * lung_vol_ml / 2, 50, 9000))
            pts = _lung_points(a, n_pts * 2, margin, rng)
            pts = pts[(pts[:, 2] - a.x_mid) * side > 0][:n_pts]
            if len(pts) < 4:
                continue
            root = hilum + np.array([drop * a.lung_len, 0.0, 0.0])
            if tree == "vein":
                root[1] += 8 * s
            # A law a bit steeper than Murray's keeps mid-sized vessels visible far out.
            tubes, fork = _grow_tree(root, pts, rng.uniform(0.24, 0.30) * s ** 0.5, rng,
                                     exponent=0.35)
            blood.append(tubes)
            blood.append(_twigs(a, pts, tubes.r0.min(), rng))
            forks.append(fork)
            if tree == "artery":
                _bronchi_along(a, tubes, side, walls, lumens, bronchus_points)
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
    blood_tubes = _Tubes.concat(blood)
    # Trachea and main bronchi.
    carina = np.array([a.hilum(1)[0] + 22 * s, a.y_ant + 0.62 * 2 * a.b_cav, a.x_mid])
    trachea = _Tubes.polyline([[top, carina[1] - 4 * s, carina[2]], carina], 9 * s)
    mains = [_Tubes.polyline([carina, a.hilum(side) + np.array([6 * s, 6 * s, 0.0])],
                             [6.5 * s, 5.5 * s]) for side in (-1, 1)]
    airway = _Tubes.concat([trachea, *mains])
    walls.append(airway.scaled_radii(1.0, 1.8 * s))
    lumens.append(airway)
    wall_tubes = _Tubes.concat(walls)
    lumen_tubes = _Tubes.concat(lumens)
    # What a nodule must not sink into (see _NodulePlacer._fits): vessels and airways over 3.5 mm.
    solid = _Tubes.concat([blood_tubes, wall_tubes])
    oesophagus = _Tubes.polyline([[top, a.vb_y - a.vb_r - 9 * s, a.x_mid + 5 * s],
                                  [-40.0, a.vb_y - a.vb_r - 9 * s, a.x_mid + 8 * s]], 7 * s)
    return _Vessels(blood=blood_tubes, walls=wall_tubes, lumens=lumen_tubes,
                    soft_tubes=oesophagus,
                    big_tubes=solid.select(np.maximum(solid.r0, solid.r1) > BIG_TUBE_MM),
                    forks=np.concatenate(forks) if forks else np.zeros((0, 3)),
                    bronchus_points=bronchus_points)


def _twigs(anat: _Anatomy, tips: np.ndarray, r_tip_mm: float,
           rng: np.random.Generator) -> _Tubes:
    """Three short thin branches from every tree tip: the tree below the modelled level.

    On CT these sub-millimetre vessels are the many one-pixel dense specks of the lung.
    """
    start = np.repeat(tips, 3, axis=0)
    direction = rng.normal(size=start.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    end = start + direction * rng.uniform(2.0, 5.0, (len(start), 1)) * anat.scale
    inside = anat.lung_at(end[:, 0], end[:, 1], end[:, 2])
    radius = np.full(int(inside.sum()), r_tip_mm)
    return _Tubes(start[inside], end[inside], radius, radius * 0.8)


def _bronchi_along(anat: _Anatomy, artery: _Tubes, side: int, walls: list[_Tubes],
                   lumens: list[_Tubes], bronchus_points: list[np.ndarray]) -> None:
    """Bronchi run beside the wider arteries (the bronchovascular bundle), air inside."""
    keep = artery.r0 >= 1.6 * math.sqrt(anat.scale)
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
    bronchus_points.append(0.5 * (wall.p0 + wall.p1) + perp * r_out[:, None])
