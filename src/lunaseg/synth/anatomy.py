"""Anatomy: one patient's organs as closed-form tests, the coarse lung mask and lung points.

The mask and the points come from the same tests as the image, so the nodules they place and
the vessel trees they seed lie in the lungs the image shows.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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
        self.a_cav = self.a_body * rng.uniform(0.74, 0.82)
        self.b_cav = self.b_body * rng.uniform(0.70, 0.78)
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
        self.med_w = np.array([3, 4, 8, 22, 25, 17, 20, 32]) * s * rng.uniform(1.0, 1.35)
        # Heart: an ellipsoid on the left of the midline resting on the diaphragm.
        self.heart_c = np.array([self.z_base + self.dome_mm + 0.17 * self.lung_len,
                                 self.y_ant + 0.42 * 2 * self.b_cav,
                                 self.x_mid + rng.uniform(0.12, 0.22) * self.a_cav])
        self.heart_r = np.array([0.21 * self.lung_len, 0.32 * 2 * self.b_cav,
                                 rng.uniform(0.44, 0.54) * self.a_cav])
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
        self.fat_hu = rng.uniform(-108, -80)
        self.muscle_hu = rng.uniform(42, 62)
        self.lung_hu = rng.uniform(-920, -895)
        self.lung_gradient_hu = rng.uniform(20, 70)
        self.lung_texture_hu = rng.uniform(6, 14)
        # Generator 5: what real chests have around the lungs and below them.
        self.breast_r = rng.uniform(28, 60) * s if rng.random() < 0.45 else 0.0
        self.breast_dx = rng.uniform(0.42, 0.58) * self.a_body
        start = rng.uniform(0.10, 0.22)  # angle from the spine, as a fraction of pi
        self.scap_away = np.array([start, start + rng.uniform(0.12, 0.22)])
        self.scap_out_mm = rng.uniform(9, 20) * s  # outside the cavity wall, over the ribs
        self.scap_mm = rng.uniform(2.5, 4.5) * s  # blade thickness
        self.scap_z0 = self.z_top - rng.uniform(0.40, 0.60) * self.lung_len  # its lower tip
        self.stomach_gas_mm = rng.uniform(12, 35) * s if rng.random() < 0.6 else 0.0
        self.organ_contrast_hu = rng.uniform(35, 70) if contrast else 0.0

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


class _CoarseLung:
    """The lungs on a grid of about 3 mm: seeds the vessel trees and places the nodules.

    ``mask`` says which cells are lung, ``edt`` how deep each cell lies below the lung wall
    (mm), ``axes`` the local mm of the cell centres along z, y and x.
    """

    def __init__(self, anat: _Anatomy) -> None:
        step = max(3.0, float(anat.spacing.max()))
        self.step = step
        axes = [np.arange(step / 2, e, step) for e in anat.extent]
        zz, yy, xx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        self.axes = axes
        self.mask = anat.lung_at(zz, yy, xx)
        padded = np.pad(self.mask, 1)  # the volume edge is no lung wall: pad then crop
        padded[0], padded[-1] = padded[1], padded[-2]
        self.edt = ndimage.distance_transform_edt(padded, sampling=step)[1:-1, 1:-1, 1:-1]


def _lung_points(anat: _Anatomy, count: int, z_margin_mm: float,
                 rng: np.random.Generator) -> np.ndarray:
    """``count`` uniform random points inside the lungs (local mm), near the volume."""
    a = anat
    lo = np.array([max(a.z_base, -z_margin_mm), a.y_ant, a.x_mid - a.a_cav])
    hi = np.array([min(a.z_top, a.extent[0] + z_margin_mm), a.y_post, a.x_mid + a.a_cav])
    found = []
    total = 0
    for _ in range(30):
        cand = lo + rng.random((max(count * 3, 64), 3)) * (hi - lo)
        ok = cand[a.lung_at(cand[:, 0], cand[:, 1], cand[:, 2])]
        found.append(ok)
        total += len(ok)
        if total >= count:
            break
    pts = np.concatenate(found)[:count]
    return pts
