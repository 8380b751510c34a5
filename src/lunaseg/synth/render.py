"""Rendering and noise: the image built slab by slab from 2D maps, tubes, bones, blur and noise.

Speed matters (a 128x512x512 scan in a few seconds on one core), so the volume is built in
slabs of a few slices: every structure is a closed-form test on precomputed 2D maps and
per-slice profiles, tubes are rasterised only inside their bounding boxes, and sub-voxel
vessels are deposited as partial-volume mass instead of being rasterised.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lunaseg.synth.anatomy import _Anatomy
from lunaseg.synth.tubes import _TubeRaster, _Tubes
from lunaseg.synth.vessels import _Vessels

AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner reconstructs
SLAB_SLICES = 8  # slices built at once: small enough to stay in cache, big enough to vectorise


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


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


class _TissueMaps:
    """Soft tissue and lung: 2D maps shared by every slice, and the slabs they make.

    The body outline and wall do not change along z; what does (the cavity, the diaphragm,
    the heart) is a per-slice profile tested against these maps.
    """

    def __init__(self, anat: _Anatomy, rng: np.random.Generator) -> None:
        self.anat = anat
        self.y = np.arange(anat.shape[1]) * anat.spacing[1]
        self.x = np.arange(anat.shape[2]) * anat.spacing[2]
        a, s = anat, anat.scale
        rows, cols = anat.shape[1:]
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
        if a.breast_r:  # fat with glandular strands, in front of the chest wall
            gland = _smooth_field(rng, (rows, cols), 4.0) > 0.5
            for side in (-1, 1):
                ey = (y - (a.cy - 0.8 * a.b_body)) / (0.7 * a.breast_r)
                ex = (x - (a.cx + side * a.breast_dx)) / a.breast_r
                breast = (ex ** 2 + ey ** 2 < 1.0) & ~body & (y < a.cy)
                wall[breast] = a.fat_hu
                wall[breast & gland] = 25.0
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
        self.liver2d = (np.where(x < a.x_mid + 25 * s, rng.uniform(50, 65), rng.uniform(35, 50))
                        + a.organ_contrast_hu).astype(np.float32) + np.zeros((rows, cols),
                                                                              np.float32)
        # Gas in the stomach's fundus, under the left dome of the diaphragm.
        self.gas2d = ((((x - (a.x_mid + 0.45 * a.a_cav)) / (0.24 * a.a_cav)) ** 2
                       + ((y - (a.cy_cav - 0.15 * a.b_cav)) / (0.32 * a.b_cav)) ** 2) < 1.0)

    def tissue_slab(self, z: np.ndarray, texture: np.ndarray, step: float) -> np.ndarray:
        """Slices at local ``z`` mm without vessels or bones; ``texture`` is the lung's, on a
        grid of ``step`` mm."""
        a = self.anat
        n = len(z)
        slab = np.repeat(self.wall2d[None], n, axis=0)
        zz = z[:, None, None]
        cavity = self.qc2d[None] < a.cav_scale(z)[:, None, None].astype(np.float32)
        slab[cavity] = a.fat_hu + 15  # mediastinal fat by default
        below = cavity & (zz < self.dia2d[None])
        slab[below] = np.broadcast_to(self.liver2d, slab.shape)[below]
        if a.stomach_gas_mm:
            gas = below & self.gas2d[None] & (zz > self.dia2d[None] - a.stomach_gas_mm)
            slab[gas] = AIR_HU + 15
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


class _Bones:
    """Ribs, sternum and spine: 2D maps of where each bone lies, painted slice by slice.

    The bones lie just outside the thoracic cavity, so the maps start from the tissue maps.
    """

    def __init__(self, anat: _Anatomy, tissue: _TissueMaps, rng: np.random.Generator) -> None:
        self.anat = anat
        y, x, out_mm = tissue.y[:, None], tissue.x[None, :], tissue.out_mm2d
        a, s = anat, anat.scale
        # Ribs: a band just outside the cavity; angle from the back sets how far a rib drops.
        phi = np.arctan2(x - a.x_mid, y - a.cy_cav)  # 0 = straight back (rows run to the back)
        away = np.abs(phi) / np.pi  # 0 at the spine, 1 at the sternum
        band = (out_mm > 1.0 * s) & (out_mm < 1.0 * s + a.rib_depth) & (away > 0.06) & (
            away < 0.86)
        self.rib_idx = np.flatnonzero(band)
        self.rib_u = ((out_mm.ravel()[self.rib_idx] - 1.0 * s) / a.rib_depth) * 2 - 1
        drop = (1 - np.cos(np.pi * away.ravel()[self.rib_idx])) / 2
        self.rib_drop = a.rib_drop * drop
        self.rib_cartilage = away.ravel()[self.rib_idx] > 0.74
        self.cortex_hu = rng.uniform(900, 1150)
        self.marrow_hu = rng.uniform(300, 450)
        # Cancellous bone is uneven: marrow varies by about +-90 HU within a bone.
        marrow = self.marrow_hu + 90 * _smooth_field(rng, out_mm.shape, 1.5)
        self.marrow2d = marrow.astype(np.float32)
        # Scapulae: thin blades lying on the back ribs in the upper chest.
        blade = np.abs(out_mm - a.rib_depth - a.scap_out_mm) < a.scap_mm / 2
        blade &= (away > a.scap_away[0]) & (away < a.scap_away[1]) & (a.q_body(y, x) < 0.97)
        self.scapula = blade
        self.scapula_marrow = blade & (np.abs(out_mm - a.rib_depth - a.scap_out_mm)
                                       < a.scap_mm / 2 - 0.9 * s)
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
        self.vb_cortex = self.vb_body & (r_vb > a.vb_r - 1.0 * s)
        self.canal = r_canal < 7.5 * s
        self.arch = (r_canal >= 7.5 * s) & (r_canal < 12.5 * s) & (y > a.vb_y + 0.6 * a.vb_r)
        self.spinous = (np.abs(dx) < 3.0 * s) & (y > canal_y + 10 * s) & (y < canal_y + 30 * s)
        # Transverse processes point sideways and back, toward the rib heads.
        along = (np.abs(dx) * 0.85 + (y - canal_y) * 0.5)
        across = np.abs(-np.abs(dx) * 0.5 + (y - canal_y) * 0.85)
        self.transverse = (across < 3.5 * s) & (along > 9 * s) & (along < 30 * s)
        self.disc_hu = rng.uniform(70, 100)

    def paint(self, slab: np.ndarray, z: np.ndarray) -> None:
        """Draw the bones into ``slab`` (slices at local ``z`` mm), in place."""
        a = self.anat
        n = len(z)
        flat = slab.reshape(n, -1)
        # Ribs: which hoop each band pixel belongs to in this slice, and where in its section.
        v = (z[:, None] + self.rib_drop[None, :] - (a.rib_first - 11 * a.rib_pitch)) / a.rib_pitch
        k = np.rint(v)
        vert = (v - k) * a.rib_pitch / (a.rib_height / 2)
        e = self.rib_u[None, :] ** 2 + vert ** 2
        bone = (e < 1.0) & (k >= 0) & (k <= 11)
        cortex = e > 0.8
        hu = np.where(cortex, self.cortex_hu, self.marrow2d.ravel()[self.rib_idx][None, :])
        hu = np.where(self.rib_cartilage[None, :], 130.0, hu).astype(np.float32)
        cur = flat[:, self.rib_idx]
        flat[:, self.rib_idx] = np.where(bone, hu, cur)
        for i in range(n):
            sl = slab[i]
            zi = z[i]
            if self.sternum_z[0] < zi < self.sternum_z[1]:
                sl[self.sternum_bone] = self.cortex_hu
                sl[self.sternum_marrow] = self.marrow2d[self.sternum_marrow]
            if zi > a.scap_z0:
                sl[self.scapula] = self.cortex_hu
                sl[self.scapula_marrow] = self.marrow2d[self.scapula_marrow]
            phase = ((zi - a.vert_phase) % a.vert_pitch) / a.vert_pitch
            if phase < 0.18:
                sl[self.vb_body] = self.disc_hu
            else:
                sl[self.vb_body] = self.marrow2d[self.vb_body]
                sl[self.vb_cortex] = self.cortex_hu
            if 0.25 < phase < 0.85:
                sl[self.arch] = self.cortex_hu
                sl[self.canal] = 25.0
            if 0.35 < phase < 0.75:
                sl[self.spinous] = self.cortex_hu
            if 0.45 < phase < 0.7:
                sl[self.transverse] = self.cortex_hu


def _render_volume(anat: _Anatomy, tissue: _TissueMaps, bones: _Bones, vessels: _Vessels,
                   nodule_tubes: list[tuple[str, _Tubes, float, int]],
                   nodule_centers: list[tuple[np.ndarray, int]],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image, (I, R, C) int16 HU, and the truth class mask of the annotated nodules
    ((I, R, C) uint8: 0 elsewhere, else each nodule's class).

    ``nodule_tubes`` are what ``_NodulePlacer.nodule_tubes`` returns, ``nodule_centers`` the
    annotated nodules' local centres with their classes; the lung texture and the scanner
    noise are drawn here.
    """
    a, s = anat, anat.scale
    shape, spacing = anat.shape, anat.spacing
    n, rows, cols = shape
    min_px = float(spacing[1:].min())
    blood = _TubeRaster(vessels.blood, shape, spacing, splat_below_mm=0.9 * min_px)
    soft = _TubeRaster(vessels.soft_tubes, shape, spacing, splat_below_mm=0.0)
    walls = _TubeRaster(vessels.walls, shape, spacing, splat_below_mm=0.0)
    lumens = _TubeRaster(vessels.lumens, shape, spacing, splat_below_mm=0.0)
    nodules = [(mode, _TubeRaster(t, shape, spacing, splat_below_mm=0.0), hu, annotated)
               for mode, t, hu, annotated in nodule_tubes]
    nodule_mask = np.zeros(shape, np.uint8)
    flat_mask = nodule_mask.reshape(-1)
    # Low-frequency lung texture on a coarse grid, interpolated per slab.
    step = 7.0 * s
    coarse_shape = tuple(int(e // step) + 3 for e in a.extent)
    texture = _smooth_field(rng, coarse_shape, 1.0)
    # Reconstruction kernels: smooth (soft-tissue) or sharp (lung) noise grain; and in some
    # scans the streaks of photon starvation, running left-right through shoulders and spine.
    smooth_kernel = rng.random() < 0.5
    grain_px = rng.uniform(0.9, 1.5) if smooth_kernel else rng.uniform(0.55, 0.85)
    noise = _NoiseTiles(rng, rows, cols, sigma_px=(grain_px, grain_px))
    noise_hu = float(np.exp(rng.uniform(np.log(15), np.log(55))))
    streak_hu = noise_hu * rng.uniform(0.3, 0.8) if rng.random() < 0.35 else 0.0
    streaks = _NoiseTiles(rng, rows, cols, sigma_px=(0.7, 14.0)) if streak_hu else None
    psf_weight = np.float32(rng.uniform(0.05, 0.12))
    out = np.empty(shape, np.int16)
    z_mm = np.arange(n) * spacing[0]
    for k0 in range(0, n, SLAB_SLICES):
        k1 = min(n, k0 + SLAB_SLICES)
        z = z_mm[k0:k1]
        slab = tissue.tissue_slab(z, texture, step)
        flat_slab = slab.reshape(-1)
        _blend(slab, blood.render(k0, k1), a.blood_hu)
        _blend_sparse(flat_slab, soft.render_sparse(k0, k1), a.muscle_hu)
        _blend_sparse(flat_slab, walls.render_sparse(k0, k1), a.muscle_hu - 20)
        _blend_sparse(flat_slab, lumens.render_sparse(k0, k1), AIR_HU)
        for mode, raster, hu, truth_class in nodules:
            index, occupancy = raster.render_sparse(k0, k1)
            _blend_sparse(flat_slab, (index, occupancy), hu, only_denser=mode == "max")
            if truth_class:
                flat_mask[index[occupancy >= 0.5] + k0 * rows * cols] = truth_class
        bones.paint(slab, z)
        _psf(slab, psf_weight)
        for i in range(k1 - k0):
            slab[i] += noise_hu * noise.draw(rng)
            if streaks is not None:
                slab[i] += streak_hu * streaks.draw(rng)
        np.clip(np.rint(slab), HU_MIN, HU_MAX, out=slab)
        out[k0:k1] = slab
    # A nodule narrower than a voxel may fill none by half; its centre voxel still counts.
    for center, truth_class in nodule_centers:
        voxel = np.rint(center / spacing).astype(int)
        nodule_mask[tuple(np.clip(voxel, 0, np.asarray(shape) - 1))] = truth_class
    return out, nodule_mask


def _blend(slab: np.ndarray, occ: np.ndarray, hu: float) -> None:
    """Mix ``hu`` into ``slab`` by a dense occupancy in [0, 1], in place."""
    slab += occ * (np.float32(hu) - slab)


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

    def __init__(self, rng: np.random.Generator, rows: int, cols: int,
                 sigma_px: tuple[float, float], count: int = 8, pad: int = 64) -> None:
        tiles = rng.standard_normal((count, rows + pad, cols + pad)).astype(np.float32)
        for axis, sigma in zip((1, 2), sigma_px):  # (rows, columns): unequal makes streaks
            ndimage.gaussian_filter1d(tiles, sigma, axis=axis, output=tiles, mode="wrap")
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
