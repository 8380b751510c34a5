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

__all__ = ["Geometry"]


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
