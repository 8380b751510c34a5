"""Nodules: LUNA16's sizes and kinds, placement in the lungs, reader ratings, and their tubes.

Diameters follow LUNA16's annotated nodules and a kind is drawn given the diameter, so kinds
never distort the sizes.  A nodule goes where a reader could see it: in the lung, clear of the
other nodules and of the big vessels and airways.  Pleural bumps, the look-alikes of
juxta-pleural nodules, are placed the same way but never annotated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lunaseg.luna import nodule_class
from lunaseg.synth.anatomy import _Anatomy, _CoarseLung
from lunaseg.synth.tubes import _Tubes
from lunaseg.synth.vessels import _Vessels

NODULE_KINDS = ("solid", "part_solid", "ground_glass", "calcified")
NODULE_LOCATIONS = ("isolated", "juxta_pleural", "juxta_vascular")
MIN_DIAMETER_MM = 3.0  # LUNA16 annotates nodules >= 3 mm; smaller ones are "excluded"
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
# 26 unit directions (cube faces, edges, corners): where a nodule's outline is probed.
_SPHERE_DIRECTIONS = np.array([(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1)
                               for x in (-1, 0, 1) if (z, y, x) != (0, 0, 0)], np.float64)
_SPHERE_DIRECTIONS /= np.linalg.norm(_SPHERE_DIRECTIONS, axis=1, keepdims=True)


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


class _NodulePlacer:
    """Draws one patient's nodules, finds room for them in the lungs, then draws their tubes.

    ``nodule_specs`` holds every nodule placed (annotated or not), the local centre and
    radius that keep later ones apart; ``nodules`` and ``excluded`` their records.
    """

    def __init__(self, anat: _Anatomy, lung: _CoarseLung, vessels: _Vessels,
                 rng: np.random.Generator, to_xyz: Callable[[np.ndarray], np.ndarray]) -> None:
        self.anat = anat
        self.lung = lung
        self.blood = vessels.blood
        self.big_tubes = vessels.big_tubes
        self.spacing = anat.spacing
        self.rng = rng
        self.to_xyz = to_xyz  # local (z, y, x) mm to patient (x, y, z) mm
        self.nodule_specs: list[dict] = []
        self.nodules: list[SynthNodule] = []
        self.excluded: list[SynthNodule] = []
        self.bump_centers: list[np.ndarray] = []

    def place_nodules(self, with_nodules: bool, max_nodules: int, n_nodules: int | None) -> None:
        """The annotated nodules (``n_nodules``, else 1..``max_nodules``), then 0-2 tiny ones."""
        rng = self.rng
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
        diameter = float(min(diameter, 1.6 * self.lung.edt.max()))
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
        edt = self.lung.edt
        margin = np.array([max(self.spacing[0], 0.5 * radius), radius * 0.6, radius * 0.6])
        z_ok = (self.lung.axes[0] > margin[0]) & (self.lung.axes[0]
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
            band = (edt > 0.55 * radius) & (edt < 0.55 * radius + self.lung.step)
        else:
            band = edt > radius + 3.0
        band &= z_ok[:, None, None]
        cells = np.argwhere(band)
        for _ in range(30):
            if not len(cells):
                return None
            cell = cells[rng.integers(len(cells))]
            center = np.array([ax[i] for ax, i in zip(self.lung.axes, cell)])
            center += rng.uniform(-0.5, 0.5, 3) * self.lung.step * 0.5
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
        cell = np.clip(np.floor(center / self.lung.step).astype(int), 0,
                       np.asarray(self.lung.mask.shape) - 1)
        if self.lung.edt[tuple(cell)] < min_depth_mm:
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

    def nodule_tubes(self) -> list[tuple[str, _Tubes, float, int]]:
        """Each nodule as tubes (spheres = zero-length tubes) with a blend mode, a HU level and
        its class in the truth mask (0: not annotated, else benign or malignant, as
        :func:`lunaseg.masks.nodule_class` says); then the pleural bumps, whose centres go to
        ``bump_centers``."""
        rng = self.rng
        out = []
        for spec in self.nodule_specs:
            c, r, kind, shape = spec["center"], spec["radius"], spec["kind"], spec["shape"]
            annotated = _truth_class(spec)
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
        for _ in range(int(rng.integers(1, 6))):
            center = self._nodule_center(rng.uniform(2.0, 4.0), "juxta_pleural")
            if center is None:
                continue
            rad = rng.uniform(1.5, 3.5)
            self.bump_centers.append(center)
            out.append(("blend", _Tubes(center[None], center[None], np.array([rad]),
                                        np.array([rad])), rng.uniform(0, 40), 0))
        return out

    def annotated_centers(self) -> list[tuple[np.ndarray, int]]:
        """Local (z, y, x) mm centres of the annotated nodules, with their truth classes."""
        return [(spec["center"], _truth_class(spec)) for spec in self.nodule_specs
                if spec["annotated"]]


def _truth_class(spec: dict) -> int:
    """A placed nodule's value in the truth mask: 0 unless annotated, else its class."""
    return nodule_class(spec["record"].is_malignant) if spec["annotated"] else 0
