"""The phantom: ``make_phantom`` runs the steps that build one synthetic chest CT.

Each step (anatomy, vessels, nodules, rendering) lives in its own module and gets what the
earlier ones made; here they run in order, the geometry is set and look-alikes are collected.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lunaseg.ct import CT
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.synth.anatomy import _Anatomy, _CoarseLung, _lung_points
from lunaseg.synth.nodules import SynthNodule, _NodulePlacer
from lunaseg.synth.render import _Bones, _TissueMaps, _render_volume
from lunaseg.synth.vessels import _Vessels, _build_vessels

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


@dataclass(eq=False)
class Phantom:
    """A synthetic CT plus its ground truth."""

    hu: np.ndarray  # (I, R, C) int16, Hounsfield units
    geometry: Geometry
    series_uid: str
    nodules: list[SynthNodule]
    excluded: list[SynthNodule]  # nodules < 3 mm: present in the image, never annotated
    lookalike_xyz: np.ndarray  # (M, 3) float64 mm: vessel cuts, bifurcations, airway walls...
    # (I, R, C) uint8: voxels at least half inside an annotated nodule (spicules included),
    # each with its nodule's class (lunaseg.masks: 1 benign, 2 malignant), 0 elsewhere.
    nodule_classes: np.ndarray | None = None

    @property
    def nodule_mask(self) -> np.ndarray | None:
        """(I, R, C) bool: the annotated nodules' voxels, whatever their class."""
        return None if self.nodule_classes is None else self.nodule_classes > 0

    def to_ct(self) -> CT:
        """The image part as a ``lunaseg.ct.CT``."""
        return CT(self.hu, self.geometry, self.series_uid)


def make_series_uid(rng: np.random.Generator) -> str:
    """An LIDC-style series UID: the LIDC root plus 30 random digits (no leading zero)."""
    digits = rng.integers(0, 10, size=30)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(str(int(d)) for d in digits)


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
    return _build_phantom(shape, spacing_xyz, uid, rng, with_nodules, max_nodules, n_nodules)


def _build_phantom(shape: tuple[int, int, int], spacing_xyz: np.ndarray, uid: str,
                   rng: np.random.Generator, with_nodules: bool, max_nodules: int,
                   n_nodules: int | None) -> Phantom:
    """Run the steps that build one phantom, each handed what the earlier ones made.

    Every step draws from ``rng``, and their order is part of what a seed means: moving one
    changes every phantom (and then PHANTOM_VERSION must change).
    """
    anat = _Anatomy(rng, shape, spacing_xyz[::-1])
    lung = _CoarseLung(anat)
    extent_xyz = spacing_xyz * np.asarray(shape[::-1])
    origin_xyz = np.array([-extent_xyz[0] / 2 + rng.uniform(-15, 15),
                           -extent_xyz[1] / 2 + rng.uniform(-25, 5),
                           rng.uniform(-300.0, -100.0)])
    geometry = Geometry(origin_xyz, anat.spacing[::-1].copy(), np.eye(3))
    to_xyz = functools.partial(_to_xyz, origin_xyz)
    vessels = _build_vessels(anat, lung, rng)
    placer = _NodulePlacer(anat, lung, vessels, rng, to_xyz)
    placer.place_nodules(with_nodules, max_nodules, n_nodules)
    tissue = _TissueMaps(anat, rng)
    bones = _Bones(anat, tissue, rng)
    nodule_tubes = placer.nodule_tubes()  # after the 2D maps, before the texture and noise
    hu, nodule_classes = _render_volume(anat, tissue, bones, vessels, nodule_tubes,
                                     placer.annotated_centers(), rng)
    lookalike = to_xyz(_lookalikes(anat, vessels, placer.bump_centers, rng))
    return Phantom(hu=hu, geometry=geometry, series_uid=uid, nodules=placer.nodules,
                   excluded=placer.excluded, lookalike_xyz=lookalike.reshape(-1, 3),
                   nodule_classes=nodule_classes)


def _to_xyz(origin_xyz: np.ndarray, local_zyx: np.ndarray) -> np.ndarray:
    """Patient (x, y, z) mm of local (z, y, x) mm, measured from voxel (0, 0, 0)."""
    return origin_xyz + np.asarray(local_zyx, np.float64)[..., ::-1]


def _lookalikes(anat: _Anatomy, vessels: _Vessels, bump_centers: list[np.ndarray],
                rng: np.random.Generator) -> np.ndarray:
    """Centres of non-nodule structures a detector may mistake for nodules (local mm)."""
    forks, bronchus_points = vessels.forks, vessels.bronchus_points
    parts = []
    t = vessels.blood
    vec = t.p1 - t.p0
    length = np.maximum(np.linalg.norm(vec, axis=1), 1e-6)
    axial = np.abs(vec[:, 0]) / length > 0.5  # run along z: round in an axial slice
    cuts = np.nonzero(axial & (t.r0 >= 0.8) & (t.r0 <= 5.0))[0]
    if len(cuts):
        pick = rng.choice(cuts, size=min(len(cuts), 150), replace=False)
        parts.append(t.p0[pick] + rng.random((len(pick), 1)) * vec[pick])
    if len(forks):
        pick = rng.choice(len(forks), size=min(len(forks), 60), replace=False)
        parts.append(forks[pick])
    if bronchus_points:
        walls = np.concatenate(bronchus_points)
        pick = rng.choice(len(walls), size=min(len(walls), 30), replace=False)
        parts.append(walls[pick])
    if bump_centers:
        parts.append(np.asarray(bump_centers))
    parts.append(_lung_points(anat, 20, 0.0, rng))
    pts = np.concatenate(parts) if parts else np.zeros((0, 3))
    inside = np.all((pts >= 0) & (pts <= anat.extent - anat.spacing), axis=1)
    pts = pts[inside]
    keep = anat.lung_at(pts[:, 0], pts[:, 1], pts[:, 2]) | _near_bumps(pts, bump_centers)
    return pts[keep]


def _near_bumps(pts: np.ndarray, bump_centers: list[np.ndarray]) -> np.ndarray:
    if not bump_centers:
        return np.zeros(len(pts), bool)
    d = np.linalg.norm(pts[:, None, :] - np.asarray(bump_centers)[None], axis=2)
    return d.min(axis=1) < 1e-6
