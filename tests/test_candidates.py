"""Candidates from logit volumes: components, erosion, groupings, centres, ranking, lung mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import (ClassStandIn, DenseStandIn, logit, rotated_geometry, sphere_phantom,
                      toy_chest)
from lunaseg.candidates import extract_candidates, score_probability, threshold_logit
from lunaseg.config import SegmentConfig
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.masks import lung_mask
from lunaseg.predict import predict_classes, predict_logits

SPEC = DenseStandIn.spec
NO_MASK = SegmentConfig(lung_mask=False)
NO_EROSION = SegmentConfig(lung_mask=False, erosion_iterations=0)


def test_sphere_gives_one_candidate_at_the_right_place():
    geometry = rotated_geometry()
    center = (11, 33, 30)
    hu, ball = sphere_phantom(center_irc=center)
    logits = predict_logits(DenseStandIn(), hu, SPEC)
    candidates = extract_candidates(logits, hu, geometry, NO_MASK, series_uid="s1")
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
    assert cand.max_logit == pytest.approx(10.8) and not cand.uneroded


def test_lunaseg_grouping_keeps_a_two_voxel_nodule_the_book_drops():
    hu = np.full((6, 16, 16), -800, dtype=np.int16)
    hu[2, 7, 7:9] = 40
    logits = predict_logits(DenseStandIn(), hu, SPEC)
    geometry = Geometry.identity((0.7, 0.7, 2.5))
    kept = extract_candidates(logits, hu, geometry, NO_MASK)
    assert len(kept) == 1 and kept[0].voxels == 2 and kept[0].uneroded
    assert kept[0].center_irc == pytest.approx((2.0, 7.0, 7.5))
    assert extract_candidates(logits, hu, geometry, NO_MASK, grouping="book") == []
    # The config's grouping wins over the model's.
    book = SegmentConfig(lung_mask=False, grouping="book")
    assert extract_candidates(logits, hu, geometry, book, grouping="lunaseg") == []


def test_book_grouping_measures_the_eroded_core_and_weights_centres_by_hu():
    hu = np.full((9, 30, 30), -800, dtype=np.int16)
    hu[2:7, 8:15, 8:15] = 40  # a 5 x 7 x 7 cube, denser on its right
    hu[2:7, 8:15, 13:15] = 900
    logits = predict_logits(DenseStandIn(), hu, SPEC)
    (lunaseg,) = extract_candidates(logits, hu, Geometry.identity(), NO_MASK)
    (book,) = extract_candidates(logits, hu, Geometry.identity(), NO_MASK, grouping="book")
    assert lunaseg.voxels == 5 * 7 * 7 and book.voxels == 3 * 5 * 5  # the core
    assert lunaseg.center_irc[2] == pytest.approx(11.0, abs=1e-3)
    # Pulled toward the dense side: HU + 1001 weighs core columns 9-12 by 1041, 13 by 1901.
    expected = (1041 * (9 + 10 + 11 + 12) + 1901 * 13) / (4 * 1041 + 1901)
    assert book.center_irc[2] == pytest.approx(expected, abs=1e-3)


def test_erosion_splits_touching_blobs_and_grows_them_back():
    hu = np.full((9, 30, 40), -800, dtype=np.int16)
    hu[2:7, 5:12, 5:12] = 40  # two cubes joined by a one-voxel-thick bridge
    hu[2:7, 5:12, 20:27] = 40
    hu[4, 8, 12:20] = 40
    logits = predict_logits(DenseStandIn(), hu, SPEC)
    geometry = Geometry.identity()
    merged = extract_candidates(logits, hu, geometry, NO_EROSION)
    split = extract_candidates(logits, hu, geometry, NO_MASK)
    assert len(merged) == 1 and len(split) == 2
    assert sum(c.voxels for c in split) == merged[0].voxels  # every voxel assigned once
    assert sorted(round(c.center_irc[2]) for c in split) == [8, 23]


def test_candidates_ranked_by_logit_and_min_voxels():
    prob = np.zeros((4, 20, 20), dtype=np.float32)
    prob[1, 2:4, 2:4] = 0.6
    prob[2, 10:13, 10:13] = 0.95
    prob[1, 16, 16] = 0.8
    hu = np.zeros(prob.shape, dtype=np.int16)
    ranked = extract_candidates(logit(prob), hu, Geometry.identity(), NO_EROSION)
    assert [c.max_probability for c in ranked] == pytest.approx([0.95, 0.8, 0.6])
    assert [c.rank for c in ranked] == [0, 1, 2]
    config = SegmentConfig(lung_mask=False, erosion_iterations=0, min_voxels=2)
    assert [c.voxels for c in extract_candidates(logit(prob), hu, Geometry.identity(),
                                                 config)] == [9, 4]


def test_saturated_probabilities_still_rank_and_score_without_ties():
    # p = 1.0 in float32 for logits above ~17; the book's model gives hundreds of these.
    logits = np.full((3, 30, 30), -100.0, dtype=np.float32)
    for k, value in enumerate((20.0, 250.0, 60.0, 35.0)):
        logits[1, 2 + 7 * k:5 + 7 * k, 5:8] = value
    hu = np.zeros(logits.shape, dtype=np.int16)
    ranked = extract_candidates(logits, hu, Geometry.identity(), NO_EROSION)
    assert [c.max_logit for c in ranked] == [250.0, 60.0, 35.0, 20.0]
    assert all(c.max_probability == 1.0 for c in ranked)  # what float32 says
    scores = [c.probability for c in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert all(0 <= s <= 1 for s in scores)
    assert all(float(repr(s)) == s for s in scores)  # the CSV keeps them apart


def test_score_probability_is_the_sigmoid_then_stays_strictly_increasing():
    for z in (-5.0, 0.0, 2.0, 5.9):
        assert score_probability(z) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-15)
    values = [score_probability(z) for z in (6.0, 10.0, 37.0, 100.0, 344.0, 1000.0)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1.0
    assert score_probability(-344.0) > 0.0
    assert threshold_logit(0.5) == 0.0


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
    found = extract_candidates(logit(prob), hu, Geometry.identity(), config)
    assert len(found) == 1 and found[0].center_irc == pytest.approx((2, 31, 18))
    assert len(extract_candidates(logit(prob), hu, Geometry.identity(), NO_EROSION)) == 2


@pytest.mark.parametrize("option, value", [("threshold", 1.5), ("min_voxels", 0),
                                           ("erosion_iterations", -1), ("grouping", "nnunet")])
def test_bad_extraction_options_are_named(option, value):
    config = SegmentConfig(**{option: value})
    logits = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=option):
        extract_candidates(logits, logits.astype(np.int16), Geometry.identity(), config)


def test_each_grouping_ranks_by_its_own_logit():
    logits = np.full((3, 20, 20), -100.0, dtype=np.float32)
    logits[1, 2:6, 2:6] = 3.0  # a large blob, one very confident voxel
    logits[1, 3, 3] = 40.0
    logits[1, 12:15, 12:15] = 9.0  # a small blob, confident all over
    hu = np.zeros(logits.shape, dtype=np.int16)
    by_mean = extract_candidates(logits, hu, Geometry.identity(), NO_EROSION)
    by_max = extract_candidates(logits, hu, Geometry.identity(), NO_EROSION, grouping="book")
    assert [c.voxels for c in by_mean] == [9, 16] and by_mean[0].score == 9.0
    assert [c.voxels for c in by_max] == [16, 9] and by_max[0].score == 40.0
    assert by_mean[1].score == pytest.approx((15 * 3.0 + 40.0) / 16)


def test_a_3_class_model_gives_each_candidate_its_p_nodule_and_p_malignant():
    hu = np.full((6, 24, 24), -800, dtype=np.int16)
    hu[2:4, 4:8, 4:8] = 500  # malignant to the stand-in (denser than 200 HU)
    hu[2:4, 14:20, 14:20] = 0  # benign
    nodule, malignancy = predict_classes(ClassStandIn(), hu, ClassStandIn.spec,
                                         crop_to_body=False)
    found = extract_candidates(nodule, hu, Geometry.identity(), NO_EROSION,
                               malignancy_logits=malignancy)
    assert len(found) == 2
    p_nodule = 1 / (1 + np.exp(-nodule.astype(np.float64)))
    p_joint = p_nodule / (1 + np.exp(-malignancy.astype(np.float64)))  # softmax p(malignant)
    for candidate, block in zip(sorted(found, key=lambda c: c.center_irc[1]),
                                ((slice(2, 4), slice(4, 8), slice(4, 8)),
                                 (slice(2, 4), slice(14, 20), slice(14, 20)))):
        # The fields the classifier fills: mean p(nodule), and p(malignant | nodule) as the
        # mean softmax p(malignant) over the mean p(nodule).
        assert candidate.p_nodule == pytest.approx(candidate.mean_probability, rel=1e-5)
        assert candidate.p_nodule == pytest.approx(p_nodule[block].mean(), rel=1e-5)
        assert candidate.p_malignant == pytest.approx(
            p_joint[block].mean() / p_nodule[block].mean(), rel=1e-5)
        assert candidate.p_nodule * candidate.p_malignant == pytest.approx(
            p_joint[block].mean(), rel=1e-5)
        # Verdicts, not a ranking: the submission keeps the candidate stage's score.
        assert not candidate.judged and candidate.rank_log_odds is None
    dense, soft = sorted(found, key=lambda c: c.center_irc[1])
    assert dense.p_malignant > 0.99 and soft.p_malignant < 0.02
    assert dense.to_dict()["p_malignant"] == dense.p_malignant
    # Without malignancy logits (a 1-class model) the candidates carry no verdicts, and the
    # same components and ranking come out.
    plain = extract_candidates(nodule, hu, Geometry.identity(), NO_EROSION)
    assert [(c.p_nodule, c.p_malignant) for c in plain] == [(None, None), (None, None)]
    assert [c.center_irc for c in plain] == [c.center_irc for c in found]
    assert [c.probability for c in plain] == [c.probability for c in found]
    assert plain[0].to_dict()["p_malignant"] is None


def test_3_class_verdicts_stay_finite_where_probabilities_round_to_1():
    hu = np.full((4, 12, 12), -800, dtype=np.int16)
    nodule = np.full(hu.shape, -30.0, dtype=np.float32)
    nodule[1:3, 3:7, 3:7] = 40.0  # float32 and float64 sigmoids are exactly 1 here
    malignancy = np.full(hu.shape, -50.0, dtype=np.float32)
    (candidate,) = extract_candidates(nodule, hu, Geometry.identity(), NO_EROSION,
                                      malignancy_logits=malignancy)
    assert candidate.mean_probability == 1.0
    assert candidate.nodule_log_odds == pytest.approx(40.0, abs=1e-6)
    assert candidate.malignant_log_odds == pytest.approx(-50.0, abs=1e-6)
