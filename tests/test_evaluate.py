"""LUNA16 scoring, checked against small cases computed by hand from the official rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lunaseg.errors import ConfigError, DataError
from lunaseg.evaluate import (
    Finding, Mark, cap_marks, found_nodule_scores, froc, load_findings, load_marks,
    match_marks, write_result_json,
)
from lunaseg.luna import UNKNOWN_DIAMETER_SCORED_MM
from lunaseg.report import plot_froc

ORIGIN = (0.0, 0.0, 0.0)


def nodule(x: float = 0.0, y: float = 0.0, z: float = 0.0, d: float = 10.0) -> Finding:
    return Finding(np.array([x, y, z]), d)


def mark(p: float, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Mark:
    return Mark(np.array([x, y, z]), p)


def far_marks(*probabilities: float) -> list[Mark]:
    """Marks far from every test nodule (each one a false positive)."""
    return [mark(p, x=500.0 + 20.0 * k) for k, p in enumerate(probabilities)]


# --------------------------------------------------------------------------- hits and misses


@pytest.mark.parametrize("xyz, hit", [
    ((4.999, 0.0, 0.0), True),
    ((2.9, 4.0, 0.0), True),
    ((0.0, 0.0, -4.99), True),
    ((5.0, 0.0, 0.0), False),  # exactly on the radius: the official script's "<" misses it
    ((3.0, 4.0, 0.0), False),  # distance 5 in two axes
    ((5.001, 0.0, 0.0), False),  # just beyond
    ((3.0, 4.0, 0.01), False),
])
def test_mark_hits_within_half_diameter(xyz, hit):
    result = froc({"a": [nodule(d=10.0)]}, {"a": [mark(0.9, *xyz)]}, bootstrap=0)
    assert result.nodules[0].hit is hit
    assert result.n_scans == 1 and result.n_nodules == 1
    if hit:
        np.testing.assert_array_equal(result.fps_per_scan, [0.0])
        np.testing.assert_array_equal(result.sensitivity, [1.0])
    else:
        np.testing.assert_array_equal(result.fps_per_scan, [1.0])
        np.testing.assert_array_equal(result.sensitivity, [0.0])


def test_duplicates_on_one_nodule_count_once_with_best_probability():
    marks = [mark(0.3, x=1.0), mark(0.7, y=-2.0), mark(0.5, z=4.0)]
    result = froc({"a": [nodule()]}, {"a": marks}, bootstrap=0)
    np.testing.assert_array_equal(result.thresholds, [0.7])
    np.testing.assert_array_equal(result.fps_per_scan, [0.0])
    np.testing.assert_array_equal(result.sensitivity, [1.0])
    record = result.nodules[0]
    assert record.best_probability == 0.7 and record.rank == 1
    assert result.sensitivities_at[0.125] == 1.0 and result.cpm == 1.0


def test_mark_on_two_overlapping_nodules_credits_both():
    nodules = [nodule(x=0.0, d=10.0), nodule(x=6.0, d=10.0)]
    result = froc({"a": nodules}, {"a": [mark(0.6, x=3.0)]}, bootstrap=0)
    assert [r.hit for r in result.nodules] == [True, True]
    np.testing.assert_array_equal(result.sensitivity, [1.0])


def test_excluded_finding_absorbs_mark():
    excluded = {"a": [Finding(np.array([100.0, 0.0, 0.0]), 6.0)]}
    marks = {"a": [mark(0.9, x=102.0), mark(0.4, x=200.0)]}
    result = froc({"a": [nodule()]}, marks, excluded=excluded, bootstrap=0)
    # Only the far mark at 0.4 is a FP; the one inside the excluded finding is ignored.
    np.testing.assert_array_equal(result.thresholds, [0.4])
    np.testing.assert_array_equal(result.fps_per_scan, [1.0])
    without = froc({"a": [nodule()]}, marks, bootstrap=0)
    np.testing.assert_array_equal(without.fps_per_scan, [1.0, 2.0])


def test_excluded_without_diameter_uses_default_radius():
    radius = UNKNOWN_DIAMETER_SCORED_MM / 2
    excluded = [Finding(np.array(ORIGIN), -1.0)]
    matches = match_marks([], [mark(0.5, x=radius - 0.01), mark(0.5, x=radius)],
                          excluded=excluded)
    assert matches.on_excluded.tolist() == [True, False]
    assert matches.is_fp.tolist() == [False, True]


def test_zero_diameter_is_radius_zero_and_negative_is_ten_mm():
    # Only a negative diameter means "unknown size"; 0 is a point nothing can hit.
    marks = [mark(0.5, x=0.01), mark(0.5, x=4.9)]
    assert match_marks([], marks, excluded=[Finding(np.array(ORIGIN), 0.0)]
                       ).on_excluded.tolist() == [False, False]
    assert match_marks([nodule(d=-1.0)], marks).hits[:, 0].tolist() == [True, True]
    assert match_marks([nodule(d=0.0)], marks).hits[:, 0].tolist() == [False, False]


def test_mark_on_nodule_and_excluded_is_a_hit():
    matches = match_marks([nodule()], [mark(0.5)], excluded=[nodule(d=30.0)])
    assert matches.hits.tolist() == [[True]]
    assert matches.on_excluded.tolist() == [False]
    assert matches.nodule_best(np.array([0.5])).tolist() == [0.5]


def test_scans_without_nodules_add_fps_and_count_in_denominator():
    annotations = {"a": [nodule()]}
    marks = {"a": [mark(0.9)], "b": far_marks(0.8, 0.5)}
    result = froc(annotations, marks, bootstrap=0)
    assert result.n_scans == 2
    np.testing.assert_array_equal(result.thresholds, [0.9, 0.8, 0.5])
    np.testing.assert_array_equal(result.fps_per_scan, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(result.sensitivity, [1.0, 1.0, 1.0])
    # A listed scan with no nodules and no marks still counts.
    listed = froc(annotations, marks, series=["a", "b", "c"], bootstrap=0)
    assert listed.n_scans == 3
    np.testing.assert_allclose(listed.fps_per_scan, [0.0, 1 / 3, 2 / 3])
    assert listed.candidates_per_scan == 1.0


def test_series_list_drops_other_scans(caplog):
    annotations = {"a": [nodule()], "z": [nodule()]}
    marks = {"a": [mark(0.9)], "y": far_marks(0.8)}
    with caplog.at_level("WARNING", logger="lunaseg.evaluate"):
        result = froc(annotations, marks, series=["a"], bootstrap=0)
    assert result.n_scans == 1 and result.n_nodules == 1
    np.testing.assert_array_equal(result.fps_per_scan, [0.0])
    assert "ignored 1 marks" in caplog.text


def test_marks_and_findings_reject_non_finite_values():
    with pytest.raises(DataError, match="probability"):
        mark(float("nan"))
    with pytest.raises(DataError, match="finite coordinates"):
        mark(0.5, x=float("inf"))
    with pytest.raises(DataError, match="3 coordinates"):
        Finding(np.zeros(2), 5.0)


def test_cap_drops_lowest_marks():
    marks = far_marks(*np.linspace(0.9, 0.5, 100)) + [mark(0.1)]
    result = froc({"a": [nodule()]}, {"a": marks}, bootstrap=0)
    record = result.nodules[0]
    assert not record.hit and record.hit_any and record.rank == 101
    assert record.best_probability == pytest.approx(0.1)
    assert result.sensitivity.max() == 0.0
    assert result.fps_per_scan.max() == 100.0
    assert result.candidate_sensitivity == 1.0  # the candidate stage ignores the cap
    assert result.candidates_per_scan == 101.0 and result.marks_per_scan == 100.0
    assert result.misses == [record]
    uncapped = froc({"a": [nodule()]}, {"a": marks}, max_marks_per_scan=None, bootstrap=0)
    assert uncapped.nodules[0].hit and uncapped.sensitivity.max() == 1.0


def test_cap_rule_first_keeps_earlier_marks_on_ties():
    marks = far_marks(0.5, 0.5) + [mark(0.5)]
    result = froc({"a": [nodule()]}, {"a": marks}, max_marks_per_scan=2, cap_rule="first",
                  bootstrap=0)
    assert result.nodules[0].rank == 3 and not result.nodules[0].hit
    marks = [mark(0.5)] + far_marks(0.5, 0.5)
    result = froc({"a": [nodule()]}, {"a": marks}, max_marks_per_scan=2, cap_rule="first",
                  bootstrap=0)
    assert result.nodules[0].rank == 1 and result.nodules[0].hit


def test_luna16_cap_drops_every_mark_tied_at_the_cut(caplog):
    # Official rule: keep the marks strictly above the probability of the (cap + 1)-th.
    probabilities = np.array([0.9, 0.8, 0.5, 0.5, 0.5, 0.1])
    assert cap_marks(probabilities, 3) == 2  # the 4th (0.5) ties the 3rd: both go
    assert cap_marks(probabilities, 5) == 5  # the 6th (0.1) is below every kept one
    assert cap_marks(probabilities, 6) == 6 and cap_marks(probabilities, None) == 6
    assert cap_marks(probabilities, 3, "first") == 3
    assert cap_marks(np.full(101, 1.0), 100) == 0  # 101 saturated marks keep nothing
    marks = [mark(0.5)] + far_marks(0.9, 0.5, 0.5)
    result = froc({"a": [nodule()]}, {"a": marks}, max_marks_per_scan=2, bootstrap=0)
    assert result.nodules[0].hit_any and not result.nodules[0].hit
    assert result.marks_per_scan == 1.0  # only the 0.9 mark survives
    assert "left 1 of the 2 places empty" in caplog.text
    with pytest.raises(ConfigError, match="cap_rule"):
        froc({"a": [nodule()]}, {"a": marks}, cap_rule="best", bootstrap=0)


# --------------------------------------------------------------------------- CPM by hand


def test_cpm_on_eight_scans_by_hand():
    # 8 scans, 4 nodules (one never found).  Events by probability give curve points
    # (fps/scan, sens): .95 TP (0, .25); .9 FP (1/8, .25); .85 TP (1/8, .5); .8 FP (1/4, .5);
    # .7 2FP (1/2, .5); .6 TP (1/2, .75); .5 4FP (1, .75); .4 8FP (2, .75).
    uids = [f"s{k}" for k in range(8)]
    annotations = {"s0": [nodule()], "s1": [nodule()], "s2": [nodule()], "s3": [nodule()]}
    marks: dict[str, list[Mark]] = {uid: [] for uid in uids}
    marks["s0"].append(mark(0.95))
    marks["s1"].append(mark(0.85))
    marks["s2"].append(mark(0.6))
    fps = [0.9, 0.8, 0.7, 0.7] + [0.5] * 4 + [0.4] * 8
    for k, p in enumerate(fps):
        marks[uids[k % 8]] += far_marks(p)
    result = froc(annotations, marks, bootstrap=0)
    np.testing.assert_allclose(result.fps_per_scan, [0, 1 / 8, 1 / 8, 1 / 4, 1 / 2, 1 / 2, 1, 2])
    np.testing.assert_allclose(result.sensitivity, [.25, .25, .5, .5, .5, .75, .75, .75])
    # On a shared FP rate the highest sensitivity counts; beyond the end the last one does.
    expected = {0.125: 0.5, 0.25: 0.5, 0.5: 0.75, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert result.sensitivities_at == pytest.approx(expected)
    assert result.cpm == pytest.approx(4.75 / 7)
    assert result.candidate_sensitivity == 0.75


def test_linear_and_step_readings():
    # One scan, two nodules.  p=.9: both 2 FPs and nodule 1 -> one point (2, .5);
    # p=.5: 4 FPs and nodule 2 -> (6, 1).  Linear from (0, 0): sens(r) = r / 4 up to 2.
    annotations = {"a": [nodule(), nodule(x=100.0)]}
    marks = {"a": [mark(0.9)] + far_marks(0.9, 0.9, 0.5, 0.5, 0.5, 0.5) + [mark(0.5, x=100.0)]}
    linear = froc(annotations, marks, bootstrap=0)
    np.testing.assert_array_equal(linear.thresholds, [0.9, 0.5])
    np.testing.assert_array_equal(linear.fps_per_scan, [2.0, 6.0])
    np.testing.assert_array_equal(linear.sensitivity, [0.5, 1.0])
    expected = [0.03125, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]
    assert list(linear.sensitivities_at.values()) == pytest.approx(expected)
    assert linear.cpm == pytest.approx(sum(expected) / 7)
    step = froc(annotations, marks, interpolation="step", bootstrap=0)
    assert list(step.sensitivities_at.values()) == pytest.approx([0, 0, 0, 0, .5, .5, 1])
    assert step.cpm == pytest.approx(2 / 7)
    # The candidate budget is always read as a step: a threshold that really exists.
    assert [froc(annotations, marks, fp_budget=b, bootstrap=0).sensitivity_at_budget
            for b in (1.0, 2.0, 5.0, 6.0, 20.0)] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert linear.fp_budget == 20.0 and linear.to_dict()["sensitivity_at_budget"] == 1.0


def test_sensitivity_by_size_uses_the_budget_threshold():
    # Two scans.  Nodules of 3.5 mm (p .9), 3.8 mm (p .2), 5 mm (never marked), 12 mm (p .6).
    # FPs: .95 and .7 in scan a, .3 in scan b.  With a budget of 1 FP per scan (2 in all) the
    # last point within it is p = .6 (FPs .95, .7), so only the 3.5 and 12 mm nodules count.
    annotations = {"a": [nodule(d=3.5), nodule(x=100.0, d=12.0)],
                   "b": [nodule(d=3.8), nodule(x=100.0, d=5.0)]}
    marks = {"a": [mark(0.9), mark(0.6, x=100.0)] + far_marks(0.95, 0.7),
             "b": [mark(0.2)] + far_marks(0.3)}
    result = froc(annotations, marks, fp_budget=1.0, bootstrap=0)
    assert result.budget_threshold == 0.6
    assert result.sensitivity_at_budget == 0.5
    bands = result.by_size()
    assert [(b.label, b.nodules, b.found, b.found_at_budget) for b in bands] == [
        ("< 4 mm", 2, 2, 1), ("4-6 mm", 1, 0, 0), ("10-20 mm", 1, 1, 1)]
    # The bands add up to the headline figures.
    assert sum(b.found_at_budget for b in bands) / result.n_nodules == result.sensitivity_at_budget
    assert sum(b.found for b in bands) / result.n_nodules == result.candidate_sensitivity
    assert [b["band"] for b in result.to_dict()["by_size"]] == ["< 4 mm", "4-6 mm", "10-20 mm"]
    assert [b.label for b in result.by_size(edges_mm=(10.0,))] == ["< 10 mm", ">= 10 mm"]
    # A budget below the first point admits no threshold at all.
    tight = froc(annotations, marks, fp_budget=0.1, bootstrap=0)
    assert tight.budget_threshold is None
    assert sum(b.found_at_budget for b in tight.by_size()) == 0


def test_no_marks_scores_zero():
    result = froc({"a": [nodule()]}, {}, bootstrap=10)
    assert result.cpm == 0.0 and result.candidate_sensitivity == 0.0
    assert result.fps_per_scan.size == 0
    assert result.cpm_ci == (0.0, 0.0)


def test_no_nodules_gives_undefined_sensitivity():
    result = froc({}, {"a": far_marks(0.5)}, bootstrap=20)
    assert np.isnan(result.cpm) and result.cpm_ci is None
    assert np.isnan(result.sensitivity_at_budget)
    assert result.to_dict()["cpm"] is None


@pytest.mark.parametrize("kwargs", [
    {"fp_rates": ()}, {"fp_rates": (0.0, 1.0)}, {"max_marks_per_scan": 0},
    {"bootstrap": -1}, {"interpolation": "cubic"}, {"fp_budget": 0.0},
    {"fp_budget": float("nan")},
])
def test_bad_options_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        froc({"a": [nodule()]}, {"a": [mark(0.5)]}, **kwargs)


def test_nothing_to_evaluate_raises():
    with pytest.raises(DataError, match="no scans"):
        froc({}, {})


# --------------------------------------------------------------------------- bootstrap


def random_study(n_scans: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    annotations: dict[str, list[Finding]] = {}
    marks: dict[str, list[Mark]] = {}
    for s in range(n_scans):
        uid = f"scan{s:03d}"
        found = []
        for k in range(rng.integers(0, 3)):
            center = np.array([40.0 * k, 0.0, 0.0])
            annotations.setdefault(uid, []).append(Finding(center, 8.0))
            if rng.random() < 0.8:
                found.append(Mark(center + rng.normal(0, 1, 3), rng.uniform(0.3, 1.0)))
        fps = [Mark(np.array([300.0 + 15 * j, 50.0, 0.0]), rng.uniform(0.0, 0.9))
               for j in range(rng.integers(80, 120))]
        marks[uid] = found + fps
    return annotations, marks


def test_bootstrap_identical_scans_give_zero_width_interval():
    annotations = {f"s{k}": [nodule()] for k in range(4)}
    marks = {f"s{k}": [mark(0.9)] + far_marks(0.5) for k in range(4)}
    result = froc(annotations, marks, bootstrap=200)
    assert result.cpm == 1.0
    assert result.cpm_ci == pytest.approx((1.0, 1.0))


def test_bootstrap_is_deterministic_and_contains_cpm():
    annotations, marks = random_study(40, seed=1)
    first = froc(annotations, marks, bootstrap=300, rng=7)
    again = froc(annotations, marks, bootstrap=300, rng=np.random.default_rng(7))
    other = froc(annotations, marks, bootstrap=300, rng=8)
    assert first.cpm_ci == again.cpm_ci
    assert first.sensitivities_ci == again.sensitivities_ci
    assert first.cpm_ci != other.cpm_ci
    lo, hi = first.cpm_ci
    assert lo < first.cpm < hi
    for rate, (a, b) in first.sensitivities_ci.items():
        assert a <= b
    assert np.all(first.band_lo <= first.band_hi)


def test_bootstrap_matches_resampled_studies():
    """The vectorised bootstrap equals scoring each resampled study from scratch."""
    annotations, marks = random_study(12, seed=3)
    uids = sorted(set(annotations) | set(marks))
    replicates = 30
    result = froc(annotations, marks, bootstrap=replicates, rng=5)
    draws = np.random.default_rng(5).integers(0, len(uids), size=(replicates, len(uids)))
    cpms = []
    for row in draws:
        copies = {f"{uids[s]}#{k}": uids[s] for k, s in enumerate(row)}
        sample = froc({c: annotations.get(u, []) for c, u in copies.items()},
                      {c: marks.get(u, []) for c, u in copies.items()},
                      series=list(copies), bootstrap=0)
        if sample.n_nodules:
            cpms.append(sample.cpm)
    assert result.cpm_ci == pytest.approx(tuple(np.percentile(cpms, [2.5, 97.5])))


def test_bootstrap_interval_brackets_the_cpm():
    annotations, marks = random_study(100, seed=2)
    result = froc(annotations, marks, bootstrap=1000, rng=0)
    low, high = result.cpm_ci
    assert low <= result.cpm <= high and low < high


# --------------------------------------------------------------------------- files


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_annotations_and_candidates(tmp_path):
    ann = write(tmp_path / "annotations_with_malignancy.csv",
                "seriesuid,coordX,coordY,coordZ,diameter_mm,malignancy\n"
                "1.2.3,-10.5,20,30.25,6.5,1\n1.2.3,0,0,0,4,0\n9.9,1,2,3,12,1\n")
    found = load_findings(ann)
    assert sorted(found) == ["1.2.3", "9.9"]
    assert found["1.2.3"][0].center_xyz.tolist() == [-10.5, 20.0, 30.25]
    assert found["1.2.3"][0].diameter_mm == 6.5
    sub = write(tmp_path / "submission.csv",
                "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,1,2,3,0.25\n")
    read = load_marks(sub)
    assert read["1.2.3"][0].probability == 0.25


def test_read_excluded_keeps_missing_diameters(tmp_path):
    path = write(tmp_path / "annotations_excluded.csv",
                 "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                 "a,1,2,3,-1\na,4,5,6,\na,7,8,9,2.5\n")
    found = load_findings(path, excluded=True)
    assert [f.diameter_mm for f in found["a"]] == [-1.0, -1.0, 2.5]
    with pytest.raises(DataError, match=r"annotations_excluded\.csv: line 3: diameter_mm"):
        load_findings(path)


@pytest.mark.parametrize("reader, header", [
    (load_findings, "seriesuid,coordX,coordY,coordZ\n"),
    (load_marks, "seriesuid,coordX,coordY,coordZ,class\n"),
])
def test_readers_reject_missing_column(tmp_path, reader, header):
    path = write(tmp_path / "broken.csv", header + "a,1,2,3,0\n")
    with pytest.raises(DataError, match=r"broken\.csv: missing column"):
        reader(path)


def test_readers_name_line_of_bad_number(tmp_path):
    path = write(tmp_path / "sub.csv", "seriesuid,coordX,coordY,coordZ,probability\n"
                                       "a,1,2,3,0.5\na,1,two,3,0.5\n")
    with pytest.raises(DataError, match=r"sub\.csv: line 3: coordY is not a number"):
        load_marks(path)
    path = write(tmp_path / "nan.csv", "seriesuid,coordX,coordY,coordZ,probability\n"
                                       "a,1,2,3,nan\n")
    with pytest.raises(DataError, match=r"nan\.csv: line 2: probability is not finite"):
        load_marks(path)


def test_reader_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.csv"):
        load_marks(tmp_path / "absent.csv")


def test_write_result_json_and_plot(tmp_path):
    annotations, marks = random_study(20, seed=4)
    result = froc(annotations, marks, bootstrap=100)
    out = write_result_json(result, tmp_path / "out" / "froc.json")
    data = json.loads(out.read_text())
    assert data["cpm"] == pytest.approx(result.cpm)
    assert set(data["sensitivities_at"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert len(data["nodules"]) == result.n_nodules
    assert list((tmp_path / "out").iterdir()) == [out]  # no temporary file left behind
    png = plot_froc(result, tmp_path / "froc.png", title="test")
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1000
    step = froc(annotations, marks, interpolation="step", bootstrap=0)
    assert plot_froc(step, tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"


def test_step_reading_matches_brute_force():
    """Step sensitivity at r = best sensitivity over thresholds with at most r FPs per scan."""
    annotations, marks = random_study(15, seed=6)
    result = froc(annotations, marks, interpolation="step", max_marks_per_scan=None, bootstrap=0)
    uids = sorted(set(annotations) | set(marks))
    fp_probs, best = [], []
    for uid in uids:
        matches = match_marks(annotations.get(uid, []), marks[uid])
        probs = np.array([m.probability for m in marks[uid]])
        fp_probs += probs[matches.is_fp].tolist()
        best += matches.nodule_best(probs).tolist()
    fp_probs, best = np.array(fp_probs), np.array(best)  # best is NaN for missed nodules
    for rate, value in result.sensitivities_at.items():
        expected = 0.0
        for t in np.unique(np.concatenate([fp_probs, best[~np.isnan(best)]])):
            if (fp_probs >= t).sum() / len(uids) <= rate:
                expected = max(expected, float((best >= t).sum()) / best.size)
        assert value == pytest.approx(expected), rate


# --------------------------------------------------------------------------- malignancy


def test_found_nodule_scores_take_the_mark_the_froc_scores():
    nodules = [Finding([0.0, 0.0, 0.0], 10.0), Finding([50.0, 0.0, 0.0], 10.0),
               Finding([100.0, 0.0, 0.0], 10.0)]
    marks = [Mark([1.0, 0.0, 0.0], 0.6), Mark([0.0, 1.0, 0.0], 0.9),  # both on nodule 0
             Mark([52.0, 0.0, 0.0], 0.3), Mark([200.0, 0.0, 0.0], 0.99)]
    scores = [0.1, 0.8, None, 0.5]
    # Nodule 0: its best mark (p 0.9) says 0.8; nodule 1: hit, but no score; nodule 2: missed.
    assert found_nodule_scores(nodules, marks, scores) == [0.8, None, None]
    with pytest.raises(ValueError, match="3 scores for 4 marks"):
        found_nodule_scores(nodules, marks, scores[:3])
