"""Shared fixtures: tiny hand-made volumes and LUNA16-layout datasets, stand-in models and
the path to ../shared."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lunaseg.config import ModelConfig
from lunaseg.ct import write_image
from lunaseg.geometry import Geometry
from lunaseg.inputs import SegmentationSpec
from lunaseg.files import write_csv
from lunaseg.luna import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, MALIGNANCY_COLUMNS

# ../shared beside the repository; LUNASEG_SHARED names it for a checkout elsewhere (a git
# worktree, a CI machine that mounts it).
SHARED = Path(os.environ.get("LUNASEG_SHARED",
                             Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when the folder is not there (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real CT data lives in ../shared beside the repo)")
    return path


class DenseStandIn(nn.Module):
    """Deterministic "model": probability rises steeply above -500 HU on the centre slice."""

    spec = SegmentationSpec(tta=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 3:4] + 500.0) / 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class ClassStandIn(nn.Module):
    """A deterministic 3-class "model" on the centre slice x (HU): background score 0,
    benign (x + 500) / 50, malignant that plus (x - 200) / 50, so dense tissue is nodule and
    what is denser than 200 HU malignant: p(malignant | nodule) = sigmoid((x - 200) / 50)."""

    spec = SegmentationSpec(tta=1)
    config = ModelConfig(n_classes=3)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        benign = (x[:, 3:4] + 500.0) / 50.0
        return torch.cat([torch.zeros_like(benign), benign,
                          benign + (x[:, 3:4] - 200.0) / 50.0], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def logit(prob: np.ndarray) -> np.ndarray:
    """Logits of a hand-made probability volume; 0 becomes the logit of what no network saw."""
    prob = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(prob > 0, np.log(prob / (1 - prob)), -100.0).astype(np.float32)


def rotated_geometry(spacing_xyz=(0.8, 0.7, 2.0)) -> Geometry:
    """30 degrees about z, z axis flipped, non-trivial origin and anisotropic spacing."""
    angle = math.radians(30.0)
    direction = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                          [math.sin(angle), math.cos(angle), 0.0],
                          [0.0, 0.0, -1.0]])
    return Geometry(np.array([-120.25, 35.5, 310.0]), np.array(spacing_xyz), direction)


def sphere_phantom(shape=(24, 70, 66), center_irc=(11, 33, 30), radius_mm=5.0,
                   spacing_xyz=(0.8, 0.7, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """-800 HU lung with a +40 HU ball (physical radius) -> (hu, ball mask)."""
    hu = np.full(shape, -800, dtype=np.int16)
    i, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    sx, sy, sz = spacing_xyz
    ball = (((i - center_irc[0]) * sz) ** 2 + ((r - center_irc[1]) * sy) ** 2
            + ((c - center_irc[2]) * sx) ** 2) <= radius_mm ** 2
    hu[ball] = 40
    return hu, ball


def toy_chest(shape_irc=(5, 64, 64)) -> np.ndarray:
    """HU of a cartoon chest: room air, an elliptic body at 40 HU, two lungs at -850 HU
    centred on row 32 and columns 18 and 46 (sized for 64x64 slices)."""
    hu = np.full(shape_irc, -1000, dtype=np.int16)
    r, c = np.ogrid[: shape_irc[1], : shape_irc[2]]
    hu[:, ((r - 32) / 28.0) ** 2 + ((c - 32) / 30.0) ** 2 <= 1] = 40
    hu[:, ((r - 32) / 15.0) ** 2 + ((c - 18) / 9.0) ** 2 <= 1] = -850
    hu[:, ((r - 32) / 15.0) ** 2 + ((c - 46) / 9.0) ** 2 <= 1] = -850
    return hu


def tiny_volume(rng: np.random.Generator, shape_irc=(20, 64, 64)) -> np.ndarray:
    """Body ellipse (+40 HU) around a lung-like core (-850 HU) with noise, air outside."""
    i, r, c = np.indices(shape_irc)
    rr = (r - shape_irc[1] / 2) / (shape_irc[1] * 0.42)
    cc = (c - shape_irc[2] / 2) / (shape_irc[2] * 0.45)
    hu = np.full(shape_irc, -1000.0)
    hu[rr**2 + cc**2 < 1] = 40
    hu[rr**2 + cc**2 < 0.7] = -850
    hu += rng.normal(0, 15, shape_irc)
    return hu.astype(np.int16)


def add_sphere(hu: np.ndarray, center_irc, radius_irc, value_hu: int = 40) -> None:
    i, r, c = np.indices(hu.shape)
    d = sum(((axis - ctr) / rad) ** 2 for axis, ctr, rad in zip((i, r, c), center_irc, radius_irc))
    hu[d <= 1] = value_hu


@pytest.fixture
def tiny_luna(tmp_path) -> Path:
    """Three series in subset0/subset1 with one or two dense nodules each and their CSVs."""
    rng = np.random.default_rng(7)
    root = tmp_path / "luna"
    annotations, candidates = [], []
    for k in range(3):
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + k}"
        geometry = Geometry.identity(spacing_xyz=(0.8, 0.8, 2.0),
                                     origin_xyz=(-25.0 - k, -30.0, -100.0 + 10 * k))
        hu = tiny_volume(rng)
        centers_irc = [(10, 28, 24)] if k != 1 else [(6, 30, 36), (13, 34, 22)]
        for center in centers_irc:
            add_sphere(hu, center, (2, 5, 5))
            xyz = geometry.irc_to_xyz(np.asarray(center, float))
            annotations.append([uid, *xyz.round(4), 8.0])
            candidates.append([uid, *(xyz + 0.3).round(4), 1])
        candidates.append([uid, *geometry.irc_to_xyz(np.array([5.0, 20, 20])).round(4), 0])
        write_image(hu, geometry, root / f"subset{k % 2}" / f"{uid}.mhd")
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)
    return root


def malignancy_rows(rows: list[list], malignant: list[bool]) -> list[list]:
    """annotations.csv rows as annotations_with_malignancy.csv rows with these ``mal_bool``s
    (ratings and the box made up to match)."""
    out = []
    for row, flag in zip(rows, malignant):
        uid, x, y, z, diameter = row
        half = diameter / 2
        ratings = "[4, 5, 4]" if flag else "[2, 1, 2]"
        out.append([uid, x, y, z, diameter, str(flag), ratings, x - half, y - half, z - half,
                    x + half, y + half, z + half, 3])
    return out


# Two kinds of nodule that tell their class by what they are made of: a benign one is
# calcified (dense), a malignant one soft tissue; same size, so a model must look at them.
BENIGN_HU, MALIGNANT_HU = 450, 30


def class_luna(root: Path, *, series: int = 12, shape_irc=(16, 64, 64), seed: int = 11,
               outline_masks: bool = False) -> Path:
    """A LUNA16-layout folder of ``series`` scans, each with one benign (BENIGN_HU) and one
    malignant (MALIGNANT_HU) nodule of 4-5 px radius at random places, their CSVs (with
    annotations_with_malignancy.csv) and, with ``outline_masks``, masks/<uid>.mha holding
    the classes (1 benign, 2 malignant)."""
    rng = np.random.default_rng(seed)
    geometry = Geometry.identity(spacing_xyz=(0.8, 0.8, 2.0))
    annotations, malignant, candidates = [], [], []
    for k in range(series):
        uid = f"1.2.840.99.{k + 1}"
        hu = tiny_volume(rng, shape_irc)
        classes = np.zeros(shape_irc, dtype=np.uint8)
        # One nodule in each half of the lung core, so they never touch.
        for value_hu, flag, col in ((BENIGN_HU, False, 22), (MALIGNANT_HU, True, 42)):
            center = (int(rng.integers(4, shape_irc[0] - 4)), int(rng.integers(26, 38)),
                      col + int(rng.integers(-2, 3)))
            radius = float(rng.uniform(4.0, 5.0))
            add_sphere(hu, center, (1.5, radius, radius), value_hu)
            i, r, c = np.indices(shape_irc)
            inside = (((i - center[0]) / 1.5) ** 2 + ((r - center[1]) / radius) ** 2
                      + ((c - center[2]) / radius) ** 2) <= 1
            classes[inside] = 2 if flag else 1
            xyz = geometry.irc_to_xyz(np.asarray(center, float))
            annotations.append([uid, *xyz.round(4), round(1.6 * radius, 3)])
            malignant.append(flag)
            candidates.append([uid, *xyz.round(4), 1])
        candidates.append([uid, *geometry.irc_to_xyz(np.array([8.0, 12, 32])).round(4), 0])
        write_image(hu, geometry, root / "subset0" / f"{uid}.mhd")
        if outline_masks:
            write_image(classes, geometry, root / "masks" / f"{uid}.mha", compress=True)
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(root / "annotations_with_malignancy.csv", MALIGNANCY_COLUMNS,
              malignancy_rows(annotations, malignant))
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)
    return root


@pytest.fixture(autouse=True)
def fresh_cli_logging():
    """``lunaseg.cli.main`` points the package logger at the stderr of its moment (pytest's
    capture of one test); later tests must not log into that closed stream."""
    import logging

    yield
    logger = logging.getLogger("lunaseg")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def spheres_and_tubes(root: Path, *, series: int = 10, seed: int = 5,
                      shape_irc=(20, 64, 64)) -> Path:
    """A LUNA16-layout set that a classifier must tell apart by shape: per series two or
    three +40 HU spheres (annotated nodules, 4-7 mm; malignant when wider than 5.5 mm)
    and four +40 HU tubes (vessels, 2.4-4 mm wide) crossing the lung, each listed once in
    candidates.csv as a non-nodule; body and lung as in :func:`tiny_volume`."""
    from lunaseg.luna import MALIGNANCY_COLUMNS

    rng = np.random.default_rng(seed)
    spacing_xyz = (0.8, 0.8, 2.0)
    annotations, candidates = [], []
    i, r, c = np.indices(shape_irc)
    mm = np.stack([i * spacing_xyz[2], r * spacing_xyz[1], c * spacing_xyz[0]], -1)
    lung_center = np.array([(shape_irc[0] - 1) / 2 * spacing_xyz[2],
                            shape_irc[1] / 2 * spacing_xyz[1], shape_irc[2] / 2 * spacing_xyz[0]])
    for k in range(series):
        uid = f"1.2.840.99.{k + 1}"
        geometry = Geometry.identity(spacing_xyz=spacing_xyz, origin_xyz=(-20.0, -25.0, 5.0 * k))
        hu = tiny_volume(rng, shape_irc).astype(np.int32)
        spheres = []
        for _ in range(int(rng.integers(2, 4))):
            for _attempt in range(50):
                center = lung_center + rng.uniform([-10, -8, -8], [10, 8, 8])
                diameter = float(rng.uniform(4.0, 7.0))
                if all(np.linalg.norm(center - s[0]) > (diameter + s[1]) / 2 + 6 for s in spheres):
                    break
            spheres.append((center, diameter))
            hu[np.linalg.norm(mm - center, axis=-1) <= diameter / 2] = 40
            xyz = geometry.irc_to_xyz(center / np.array([spacing_xyz[2], spacing_xyz[1],
                                                         spacing_xyz[0]]))
            annotations.append([uid, *np.round(xyz, 4), round(diameter, 3),
                                "True" if diameter > 5.5 else "False", "[]", *[0.0] * 6, 0])
            candidates.append([uid, *np.round(xyz, 4), 1])
        for _ in range(4):
            for _attempt in range(50):
                point = lung_center + rng.uniform([-10, -8, -8], [10, 8, 8])
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                radius = float(rng.uniform(1.2, 2.0))

                def line_distance(p: np.ndarray) -> np.ndarray:
                    offset = p - point
                    return np.linalg.norm(offset - (offset @ direction)[..., None] * direction,
                                          axis=-1)

                if all(line_distance(s[0]) > s[1] / 2 + radius + 3 for s in spheres):
                    break
            lung = (hu > -950) & (hu < -700)  # vessels stay inside the lungs
            hu[(line_distance(mm) <= radius) & lung] = 40
            xyz = geometry.irc_to_xyz(point / np.array([spacing_xyz[2], spacing_xyz[1],
                                                        spacing_xyz[0]]))
            candidates.append([uid, *np.round(xyz, 4), 0])
        write_image(hu.astype(np.int16), geometry, root / f"subset{k % 2}" / f"{uid}.mhd")
    write_csv(root / "annotations_with_malignancy.csv", MALIGNANCY_COLUMNS, annotations)
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, [a[:5] for a in annotations])
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)
    return root
