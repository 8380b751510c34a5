"""Voxel <-> patient coordinates for volumes with any direction matrix.

Arrays are indexed (index, row, col) = (I, R, C) = (z, y, x).  ITK's convention is

    xyz = origin_xyz + direction @ (spacing_xyz * cri),   cri = (col, row, index)

so the inverse is ``cri = (inverse(direction) @ (xyz - origin_xyz)) / spacing_xyz``.
(The book's ``xyz2irc`` applies the direction on the wrong side; that only works for
diagonal directions.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lunaseg.errors import DataError

__all__ = ["Geometry", "Reorientation", "canonical_orientation"]


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a (I, R, C) voxel array sits in patient space (millimetres, LPS as in ITK)."""

    origin_xyz: np.ndarray  # (3,) float64, mm: centre of voxel (0, 0, 0)
    spacing_xyz: np.ndarray  # (3,) float64, mm per voxel along col, row, index
    direction: np.ndarray  # (3, 3) float64, columns = patient directions of col, row, index axes

    def __post_init__(self) -> None:
        origin = np.asarray(self.origin_xyz, dtype=np.float64).reshape(3)
        spacing = np.asarray(self.spacing_xyz, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise DataError(f"voxel spacing must be positive, got {spacing.tolist()}")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise DataError(f"direction matrix is singular: {direction.tolist()}")
        object.__setattr__(self, "origin_xyz", origin)
        object.__setattr__(self, "spacing_xyz", spacing)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "_inverse_direction", np.linalg.inv(direction))

    @classmethod
    def identity(cls, spacing_xyz=(1.0, 1.0, 1.0), origin_xyz=(0.0, 0.0, 0.0)) -> "Geometry":
        """Axis-aligned geometry (the LUNA16 case)."""
        return cls(np.asarray(origin_xyz), np.asarray(spacing_xyz), np.eye(3))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.allclose(other, atol=0.0)

    def allclose(self, other: "Geometry", atol: float = 1e-5) -> bool:
        """Same origin, spacing and direction within ``atol``."""
        return (
            np.allclose(self.origin_xyz, other.origin_xyz, rtol=0.0, atol=atol)
            and np.allclose(self.spacing_xyz, other.spacing_xyz, rtol=0.0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=atol)
        )

    def xyz_to_irc_float(self, xyz: np.ndarray) -> np.ndarray:
        """Patient mm -> continuous (index, row, col); accepts (3,) or (N, 3)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        cri = ((xyz - self.origin_xyz) @ self._inverse_direction.T) / self.spacing_xyz
        return cri[..., ::-1].copy()

    def xyz_to_irc(self, xyz: np.ndarray) -> np.ndarray:
        """Patient mm -> nearest voxel (index, row, col) as int64; accepts (3,) or (N, 3)."""
        return np.rint(self.xyz_to_irc_float(xyz)).astype(np.int64)

    def irc_to_xyz(self, irc: np.ndarray) -> np.ndarray:
        """(Continuous) voxel (index, row, col) -> patient mm; accepts (3,) or (N, 3)."""
        cri = np.asarray(irc, dtype=np.float64)[..., ::-1]
        return (cri * self.spacing_xyz) @ self.direction.T + self.origin_xyz

    def to_dict(self) -> dict:
        """JSON-friendly form (lists of floats)."""
        return {
            "origin_xyz": self.origin_xyz.tolist(),
            "spacing_xyz": self.spacing_xyz.tolist(),
            "direction": self.direction.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(np.asarray(data["origin_xyz"]), np.asarray(data["spacing_xyz"]),
                   np.asarray(data["direction"]))


@dataclass(frozen=True)
class Reorientation:
    """A permutation and flips of (I, R, C) axes taking a voxel array into the canonical
    order (identity direction: columns, rows and slices running to the patient's Left,
    Posterior and Superior, as LUNA16 stores its scans) and back.

    ``axes[k]`` is the input axis that becomes canonical axis k; ``flips[k]`` says whether
    canonical axis k runs the other way.  Arrays with extra leading axes are handled too.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shape_irc: tuple[int, int, int]  # of the input array

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """``array`` (..., I, R, C) in the input's order -> the canonical order."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.axes)))
        flip = tuple(lead + k for k in range(3) if self.flips[k])
        return np.ascontiguousarray(np.flip(out, flip) if flip else out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """``array`` (..., I, R, C) in the canonical order -> the input's order."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        flip = tuple(lead + k for k in range(3) if self.flips[k])
        out = np.flip(array, flip) if flip else array
        inverse = np.argsort(self.axes)
        return np.ascontiguousarray(np.transpose(out, (*range(lead),
                                                       *(lead + a for a in inverse))))

    def irc_from_canonical(self, irc: np.ndarray) -> np.ndarray:
        """Continuous canonical (index, row, col) coordinates (..., 3) -> the input's."""
        irc = np.asarray(irc, dtype=np.float64)
        canonical_shape = np.asarray(self.shape_irc)[list(self.axes)]
        flipped = np.where(self.flips, canonical_shape - 1 - irc, irc)
        out = np.empty_like(flipped)
        out[..., list(self.axes)] = flipped
        return out


def canonical_orientation(geometry: Geometry, shape_irc: tuple[int, int, int]
                          ) -> tuple[Reorientation, Geometry]:
    """How to bring a volume of ``geometry`` into the canonical voxel order, and the
    geometry of the canonical array (the same patient positions, near-identity direction).

    Each array axis goes to the patient axis its direction is closest to; a rotated (oblique)
    scan keeps its small rotation in the canonical geometry.
    """
    direction = geometry.direction
    axes, flips = [0, 0, 0], [False, False, False]
    taken: set[int] = set()
    # Direction column j belongs to array axis 2 - j (columns are col, row, index).
    for j in np.argsort(-np.abs(direction).max(axis=0)):  # most clear-cut axes first
        column = np.abs(direction[:, j])
        patient = next(int(p) for p in np.argsort(-column) if int(p) not in taken)
        taken.add(patient)
        canonical_axis = 2 - patient  # patient x -> col (axis 2), z -> index (axis 0)
        axes[canonical_axis] = 2 - int(j)
        flips[canonical_axis] = bool(direction[patient, j] < 0)
    reorientation = Reorientation(tuple(axes), tuple(flips), tuple(int(n) for n in shape_irc))
    # Canonical voxel 0 is the input voxel at the far end of every flipped axis.
    corner_irc = reorientation.irc_from_canonical(np.zeros(3))
    origin = geometry.irc_to_xyz(corner_irc)
    columns, spacing = [], []
    for k in (2, 1, 0):  # canonical col, row, index -> direction columns 0, 1, 2
        j = 2 - reorientation.axes[k]
        sign = -1.0 if reorientation.flips[k] else 1.0
        columns.append(sign * direction[:, j])
        spacing.append(geometry.spacing_xyz[j])
    return reorientation, Geometry(origin, np.asarray(spacing), np.stack(columns, axis=1))
