"""Nodule masks: the book's heuristic exactly, but safe at the volume edges."""

from __future__ import annotations

import numpy as np

from conftest import add_sphere, shared_path, toy_chest
from lunaseg.config import MaskConfig
from lunaseg.ct import load_ct
from lunaseg.geometry import Geometry
from lunaseg.masks import annotation_mask, lung_mask, nodule_radii_irc, positive_slices


def book_mask(hu: np.ndarray, centers_irc, threshold_hu=-700) -> np.ndarray:
    """The book's loop, transcribed as a reference (valid away from the edges only)."""
    boxes = np.zeros(hu.shape, bool)
    for ci, cr, cc in centers_irc:
        radii = []
        for axis in range(3):
            radius = 2
            while True:
                plus, minus = [ci, cr, cc], [ci, cr, cc]
                plus[axis] += radius
                minus[axis] -= radius
                if hu[tuple(plus)] > threshold_hu and hu[tuple(minus)] > threshold_hu:
                    radius += 1
                else:
                    break
            radii.append(radius)
        ri, rr, rc = radii
        boxes[ci - ri:ci + ri + 1, cr - rr:cr + rr + 1, cc - rc:cc + rc + 1] = True
    return boxes & (hu > threshold_hu)


def test_matches_the_book_away_from_edges():
    rng = np.random.default_rng(3)
    hu = rng.normal(-850, 40, (30, 60, 60)).astype(np.int16)
    centers = [(10, 20, 20), (18, 40, 35)]
    add_sphere(hu, centers[0], (3, 6, 5))
    add_sphere(hu, centers[1], (4, 4, 7), value_hu=-200)
    hu[18, 40:52, 35] = 60  # a vessel leaving the second nodule, as real ones do
    geometry = Geometry.identity(spacing_xyz=(0.7, 0.7, 1.5), origin_xyz=(-20, 10, -300))
    nodules = [(geometry.irc_to_xyz(np.array(c, float)), 6.0) for c in centers]
    mask = annotation_mask(hu, geometry, nodules)
    np.testing.assert_array_equal(mask, book_mask(hu, centers))
    assert positive_slices(mask).tolist() == sorted(set(np.flatnonzero(mask.any(axis=(1, 2)))))


def test_edge_nodule_does_not_wrap_around():
    hu = np.full((12, 30, 30), -900, np.int16)
    add_sphere(hu, (0, 15, 15), (3, 4, 4))  # centred on slice 0: the book's mask was empty
    add_sphere(hu, (11, 28, 1), (3, 3, 3))  # and a corner one
    geometry = Geometry.identity()
    mask = annotation_mask(hu, geometry, [(np.array([15.0, 15.0, 0.0]), 8.0),
                                          (np.array([1.0, 28.0, 11.0]), 6.0)])
    assert mask[0, 15, 15] and mask[11, 28, 1]
    assert positive_slices(mask).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert not mask[4:8].any()  # nothing leaked to the far side of the volume
    # At the edge the side still inside the volume decides how far the box grows.
    radii = nodule_radii_irc(hu, np.array([0, 15, 15]), MaskConfig())
    assert radii.tolist() == [4, 5, 5]
    # A line of dense voxels from edge to edge stops cleanly once both sides are outside.
    solid = np.full((5, 7, 9), 100, np.int16)
    assert nodule_radii_irc(solid, np.array([2, 3, 4]), MaskConfig()).tolist() == [2, 3, 4]


def test_centres_outside_the_volume_are_ignored():
    hu = np.full((5, 10, 10), 100, np.int16)
    mask = annotation_mask(hu, Geometry.identity(), [(np.array([3.0, 3.0, 50.0]), 5.0)])
    assert not mask.any()


def test_real_nodule_on_lidc_0001():
    ct = load_ct(shared_path("data", "lidc-idri-0001", "dicom"))
    center_xyz, diameter_mm = np.array([56.208, 86.343, -115.868]), 23.35  # LUNA16 row
    center_irc = ct.xyz_to_irc(center_xyz)
    spacing_irc = ct.spacing_xyz[::-1]
    limit_vox = diameter_mm / 2 / spacing_irc + 2

    book = annotation_mask(ct.hu, ct.geometry, [(center_xyz, diameter_mm)])
    assert book[tuple(center_irc)]
    assert 2000 < book.sum() < 20000
    # The book's box follows dense tissue along each axis: here it runs ~16 mm along the
    # rows into the adjacent chest wall (a known weakness), but stays on the nodule's slices.
    reach_vox = np.abs(np.argwhere(book) - center_irc).max(axis=0)
    assert reach_vox[0] <= limit_vox[0] and reach_vox[2] <= limit_vox[2]

    capped = annotation_mask(ct.hu, ct.geometry, [(center_xyz, diameter_mm)],
                             MaskConfig(bound_by_diameter=True))
    assert capped[tuple(center_irc)] and not (capped & ~book).any()
    reach_vox = np.abs(np.argwhere(capped) - center_irc).max(axis=0)
    assert np.all(reach_vox <= limit_vox)
    # About a sphere's worth of voxels: within a factor of two of the annotated volume.
    volume_mm3 = capped.sum() * np.prod(ct.spacing_xyz)
    assert 0.5 < volume_mm3 / (np.pi / 6 * diameter_mm**3) < 2.0
    assert set(positive_slices(capped)) <= set(range(2, 13))


def test_lung_mask_ignores_small_air_pockets():
    """A few air voxels in the back wall are not lung, so the spine beside them can be
    filtered out; the lungs themselves stay whole."""
    hu = toy_chest((6, 64, 64))
    hu[2:4, 54:56, 31:33] = -900  # a gas pocket in the back muscles
    lungs = lung_mask(hu, dilation_mm=2.0)
    assert not lungs[2, 55, 32] and not lungs[:, 51:, 25:40].any()
    assert lungs[:, 32, 18].all() and lungs[:, 32, 46].all()
    assert lung_mask(hu, dilation_mm=2.0, min_fraction=0.0)[2, 55, 32]  # kept without it


def test_lung_mask_on_real_ct():
    ct = load_ct(shared_path("data", "lidc-idri-0001", "dicom"))
    lungs = lung_mask(ct.hu, spacing_irc=ct.spacing_xyz[::-1])
    assert lungs.shape == ct.hu.shape
    assert 0.1 < lungs.mean() < 0.35
    assert not lungs[:, :5, :].any() and not lungs[:, :, :5].any()  # outside air is not lung
    assert np.median(ct.hu[lungs]) < -700
    # The juxta-pleural nodule is not enclosed by lung, but it touches the mask, which is
    # what candidate filtering asks of a component.
    nodule = annotation_mask(ct.hu, ct.geometry, [(np.array([56.208, 86.343, -115.868]), 23.35)],
                             MaskConfig(bound_by_diameter=True))
    assert (nodule & lungs).any()
