"""Geometry must agree with ITK for any direction matrix, not just LUNA16's identity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from lunaseg.errors import DataError
from lunaseg.geometry import Geometry

finite = st.floats(-400, 400, allow_nan=False, allow_subnormal=False)
spacing = st.floats(0.3, 5.0, allow_nan=False, allow_subnormal=False)


def _rotation(angles: tuple[float, float, float], flips: tuple[bool, bool, bool]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz @ np.diag([-1.0 if f else 1.0 for f in flips])


# ITK itself mishandles subnormal floats (its SVD fails), so none are drawn; derandomized
# so CI sees the same cases every run.
@settings(max_examples=150, deadline=None, derandomize=True)
@given(origin=st.tuples(finite, finite, finite), spacing_xyz=st.tuples(spacing, spacing, spacing),
       angles=st.tuples(*[st.floats(-np.pi, np.pi, allow_subnormal=False)] * 3), flips=st.tuples(*[st.booleans()] * 3),
       point=st.tuples(finite, finite, finite))
def test_xyz_to_irc_matches_simpleitk(origin, spacing_xyz, angles, flips, point):
    direction = _rotation(angles, flips)
    image = sitk.Image(4, 4, 4, sitk.sitkInt16)
    image.SetOrigin(origin)
    image.SetSpacing(spacing_xyz)
    image.SetDirection(direction.ravel().tolist())
    geometry = Geometry(np.array(origin), np.array(spacing_xyz), direction)

    expected_cri = np.array(image.TransformPhysicalPointToContinuousIndex(point))
    irc = geometry.xyz_to_irc_float(np.array(point))
    np.testing.assert_allclose(irc, expected_cri[::-1], atol=1e-6)
    # ...and back again, to the point we started from.
    np.testing.assert_allclose(geometry.irc_to_xyz(irc), point, atol=1e-6)
    cri = tuple(int(v) for v in np.rint(expected_cri[::-1])[::-1])
    np.testing.assert_allclose(geometry.irc_to_xyz(np.array(cri[::-1], float)),
                               image.TransformIndexToPhysicalPoint(cri), atol=1e-6)


def test_vectorised_and_rounded():
    geometry = Geometry(np.array([10.0, -5.0, 3.0]), np.array([0.5, 0.5, 2.0]),
                        _rotation((0.3, 0.0, 1.1), (True, False, False)))
    irc = np.array([[1.0, 2.0, 3.0], [4.4, 5.6, 6.5], [0.0, 0.0, 0.0]])
    xyz = geometry.irc_to_xyz(irc)
    assert xyz.shape == (3, 3)
    np.testing.assert_allclose(geometry.xyz_to_irc_float(xyz), irc, atol=1e-9)
    rounded = geometry.xyz_to_irc(xyz)
    assert rounded.dtype == np.int64
    np.testing.assert_array_equal(rounded, [[1, 2, 3], [4, 6, 6], [0, 0, 0]])


def test_dict_round_trip_and_equality():
    geometry = Geometry(np.array([1.0, 2, 3]), np.array([0.7, 0.7, 2.5]), np.eye(3)[[1, 0, 2]])
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    assert geometry != Geometry.identity()


@pytest.mark.parametrize("spacing_xyz, direction", [((1, 0, 1), np.eye(3)),
                                                    ((1, 1, 1), np.zeros((3, 3)))])
def test_bad_geometry_is_refused(spacing_xyz, direction):
    with pytest.raises(DataError, match="spacing|singular"):
        Geometry(np.zeros(3), np.array(spacing_xyz, float), direction)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_canonical_orientation_matches_simpleitk_dicomorient(perm):
    import SimpleITK as sitk

    from lunaseg.geometry import canonical_orientation

    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    base = Geometry(np.array([10.0, -20.0, 30.0]), np.array([0.7, 0.8, 2.5]), np.eye(3))
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(base.origin_xyz))
    image.SetSpacing(tuple(base.spacing_xyz))
    for flips in itertools.product([False, True], repeat=3):
        stored = sitk.Flip(sitk.PermuteAxes(image, list(perm)), list(flips))
        voxels = sitk.GetArrayFromImage(stored)
        geometry = Geometry(np.array(stored.GetOrigin()), np.array(stored.GetSpacing()),
                            np.array(stored.GetDirection()).reshape(3, 3))
        reorientation, canonical = canonical_orientation(geometry, voxels.shape)
        np.testing.assert_array_equal(reorientation.to_canonical(voxels), array)
        np.testing.assert_array_equal(
            reorientation.to_canonical(voxels),
            sitk.GetArrayFromImage(sitk.DICOMOrient(stored, "LPS")))
        assert canonical.allclose(base, atol=1e-9)
        np.testing.assert_array_equal(reorientation.from_canonical(array), voxels)
        irc = np.array([1.5, 2.0, 3.25])
        np.testing.assert_allclose(geometry.irc_to_xyz(reorientation.irc_from_canonical(irc)),
                                   canonical.irc_to_xyz(irc), atol=1e-9)
