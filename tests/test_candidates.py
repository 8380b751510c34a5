"""Candidates from probability volumes: components, erosion, centres, scores, lung mask."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DenseStandIn, rotated_geometry, sphere_phantom, toy_chest
from lunaseg.candidates import extract_candidates
from lunaseg.config import SegmentConfig
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.masks import lung_mask
from lunaseg.predict import predict_volume

SPEC = DenseStandIn.spec


def test_sphere_gives_one_candidate_at_the_right_place():
    geometry = rotated_geometry()
    center = (11, 33, 30)
    hu, ball = sphere_phantom(center_irc=center)
    prob = predict_volume(DenseStandIn(), hu, SPEC)
    candidates = extract_candidates(prob, hu, geometry, SegmentConfig(), series_uid="s1")
    assert len(candidates) == 1
    cand = candidates[0]
    expected_xyz = geometry.irc_to_xyz(np.array(center, dtype=float))
    half_voxel = 0.5 * float(np.min(geometry.spacing_xyz))
    assert np.linalg.norm(np.asarray(cand.center_xyz) - expected_xyz) <= half_voxel
    np.testing.assert_allclose(cand.center_irc, center, atol=0.5)
    # Sizes are measured on the segmented voxels, not on the eroded core.
    assert cand.voxels == int(ball.sum())
    assert cand.diameter_mm == pytest.approx(10.0, rel=0.1)
    assert cand.slice_span == (int(np.flatnonzero(ball.any(axis=(1, 2)))[0]),
                               int(np.flatnonzero(ball.any(axis=(1, 2)))[-1]))
    assert cand.max_probability > 0.99 and cand.series_uid == "s1"
    assert not cand.uneroded


def test_erosion_keeps_a_two_voxel_nodule_unless_told_otherwise():
    hu = np.full((6, 16, 16), -800, dtype=np.int16)
    hu[2, 7, 7:9] = 40
    prob = predict_volume(DenseStandIn(), hu, SPEC)
    geometry = Geometry.identity((0.7, 0.7, 2.5))
    kept = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=1))
    assert len(kept) == 1 and kept[0].voxels == 2 and kept[0].uneroded
    assert kept[0].center_irc == pytest.approx((2.0, 7.0, 7.5))
    book = extract_candidates(prob, hu, geometry,
                              SegmentConfig(erosion_iterations=1, keep_vanished=False))
    assert book == []


def test_erosion_splits_touching_blobs_and_grows_them_back():
    hu = np.full((9, 30, 40), -800, dtype=np.int16)
    hu[2:7, 5:12, 5:12] = 40  # two cubes joined by a one-voxel-thick bridge
    hu[2:7, 5:12, 20:27] = 40
    hu[4, 8, 12:20] = 40
    prob = predict_volume(DenseStandIn(), hu, SPEC)
    geometry = Geometry.identity()
    merged = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=0))
    split = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=1))
    assert len(merged) == 1 and len(split) == 2
    assert sum(c.voxels for c in split) == merged[0].voxels  # every voxel assigned once
    assert sorted(round(c.center_irc[2]) for c in split) == [8, 23]


def test_connectivity_option():
    prob = np.zeros((3, 5, 5), dtype=np.float32)
    prob[1, 1, 1] = prob[1, 2, 2] = 0.9  # diagonal neighbours
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0)
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 2
    config.connectivity = 26
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 1


def test_candidates_sorted_and_min_voxels():
    prob = np.zeros((4, 20, 20), dtype=np.float32)
    prob[1, 2:4, 2:4] = 0.6
    prob[2, 10:13, 10:13] = 0.95
    prob[1, 16, 16] = 0.8
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0)
    ranked = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.max_probability for c in ranked] == pytest.approx([0.95, 0.8, 0.6])
    assert [c.rank for c in ranked] == [0, 1, 2]
    config.min_voxels = 2
    assert [c.voxels for c in extract_candidates(prob, hu, Geometry.identity(), config)] == [9, 4]


def test_score_ranks_by_mean_or_max_probability():
    prob = np.zeros((3, 20, 20), dtype=np.float32)
    prob[1, 2:6, 2:6] = 0.6  # a large, uncertain blob with one saturated voxel
    prob[1, 3, 3] = 1.0
    prob[1, 12:14, 12:14] = 0.9  # a small, confident blob
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0, score="mean")
    by_mean = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.probability for c in by_mean] == pytest.approx([0.9, (15 * 0.6 + 1) / 16])
    assert by_mean[1].max_probability == 1.0
    config.score = "max"
    by_max = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.probability for c in by_max] == pytest.approx([1.0, 0.9])
    assert by_max[0].voxels == 16


def test_center_weighting_by_probability_ignores_a_dense_neighbour():
    # A confident blob next to a barely-segmented dense bone: HU weighting pulls the centre
    # towards the bone, probability weighting stays on the blob.
    prob = np.zeros((1, 5, 20), dtype=np.float32)
    hu = np.zeros(prob.shape, dtype=np.int16)
    prob[0, 2, 4:10] = 0.99
    prob[0, 2, 10:13] = 0.51
    hu[0, 2, 10:13] = 1000
    config = SegmentConfig(erosion_iterations=0)
    (by_p,) = extract_candidates(prob, hu, Geometry.identity(), config)
    config.center_weighting = "hu"
    (by_hu,) = extract_candidates(prob, hu, Geometry.identity(), config)
    expected = (6.5 * 0.99 * 6 + 11 * 0.51 * 3) / (0.99 * 6 + 0.51 * 3)
    assert by_p.center_irc[2] == pytest.approx(expected, abs=1e-4)
    assert by_hu.center_irc[2] > by_p.center_irc[2] + 1


def test_lung_mask_drops_components_outside_the_lungs():
    shape = (5, 64, 64)
    hu = toy_chest(shape)
    hu[2, 30:33, 17:20] = 30  # nodule inside the left lung
    lung = lung_mask(hu, dilation_mm=2.0)
    assert lung[2, 31, 18] and lung[2, 32, 46]  # the nodule is a filled hole
    assert not lung[2, 2, 2] and not lung[2, 5, 32]  # room air, chest wall
    prob = np.zeros(shape, dtype=np.float32)
    prob[2, 30:33, 17:20] = 0.9  # the nodule
    prob[2, 6:8, 31:33] = 0.9  # in the chest wall, far from the lungs
    config = SegmentConfig(erosion_iterations=0, lung_mask=True)
    found = extract_candidates(prob, hu, Geometry.identity(), config)
    assert len(found) == 1 and found[0].center_irc == pytest.approx((2, 31, 18))
    config.lung_mask = False
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 2


@pytest.mark.parametrize("option, value", [("connectivity", 8), ("threshold", 1.5),
                                           ("center_weighting", "mass"), ("min_voxels", 0),
                                           ("score", "median")])
def test_bad_segment_options_are_named(option, value):
    config = SegmentConfig(**{option: value})
    prob = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=option):
        extract_candidates(prob, prob.astype(np.int16), Geometry.identity(), config)
