"""LUNA16 scoring: FROC curve, CPM and bootstrap confidence intervals.

Pure numpy, so a submission can be scored without torch or the images.  The rules are those
of the LUNA16 organisers' evaluation script (``noduleCADEvaluationLUNA16.py``); where it
leaves a choice open, the choice is written down:

* A mark hits a nodule when its Euclidean distance to the nodule centre is strictly less than
  diameter / 2 (compared as squared distances).
* Only a diameter < 0 means "size unknown" and is scored as 10 mm
  (``luna.UNKNOWN_DIAMETER_SCORED_MM``); a finding of diameter 0 has radius 0.
* A mark that hits several (overlapping) nodules credits every one of them.
* Several marks on one nodule count once, with the best probability.
* A mark that hits no nodule but lies within an excluded finding is ignored (neither TP nor FP).
* The 100-mark cap (``cap_rule="luna16"``, the default): a scan's marks are sorted by
  probability and only those strictly above the probability of the 101st are kept, so a tie
  at the cut keeps fewer than 100 (101 marks sharing the top probability keep none; a warning
  says how many marks ties dropped).  ``cap_rule="first"`` keeps exactly 100, the earlier
  marks of the file winning ties.
* The scans scored are the ``series`` given (LUNA16's seriesuids.csv); without a list, every
  series with a nodule or a mark.
* The FROC curve has one point per distinct probability ``t``: (FP marks with p >= t) / scans
  against (nodules whose best mark has p >= t) / nodules.  Sensitivity at an FP rate is read from
  the curve started at (0, 0) by linear interpolation (the kit's approach; ``"step"`` gives the
  conservative reading instead).  A rate beyond the curve's end gets the curve's last (highest)
  sensitivity; at an FP rate several points share, the highest of their sensitivities is used.
* When nodules exist but no mark hits any, sensitivities are 0 (the official script divides
  0 by 0 and reports NaN); without any nodule they are undefined (NaN).
* The candidate-stage sensitivity ignores the mark cap: it is the share of nodules that any mark
  hits, which is what a candidate generator is judged on.
* ``sensitivity_at_budget`` reads the curve conservatively (step, a real threshold) at a
  candidate-stage budget of ``CANDIDATE_FP_BUDGET`` false positives per scan: "how many nodules
  survive if a second stage may only look at this many wrong places per scan".
* ``FrocResult.by_size()`` splits both sensitivities by nodule diameter, since small nodules
  are where detectors differ; its budget column uses the same threshold as the curve.

For malignancy (chapter exercise 3b): :func:`found_nodule_scores` takes,
for each nodule, a score of the mark that would be scored for it (its best-ranked hitting
mark), and :func:`lunaseg.roc.roc_auc` with :func:`lunaseg.roc.roc_auc_interval` rates
those scores against the nodules' labels, whichever model gave them (a 3-class U-Net or the
malignancy classifier).  Only found nodules enter: a missed one has no score, as a classifier
after the candidate stage would never see it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lunaseg.config import LUNA16_MAX_MARKS
from lunaseg.errors import ConfigError, DataError
from lunaseg.files import write_text_atomic
from lunaseg.luna import (UNKNOWN_DIAMETER_SCORED_MM, Nodule, SubmissionMark, read_marks,
                          read_nodules)

__all__ = [
    "LUNA_FP_RATES", "CANDIDATE_FP_BUDGET", "DIAMETER_BANDS_MM", "CAP_RULES",
    "Finding", "Mark", "Matches", "NoduleRecord", "SizeBand", "FrocResult", "size_band_label",
    "findings_by_series", "marks_by_series", "load_findings", "load_marks", "match_marks",
    "cap_marks", "froc", "write_result_json", "found_nodule_scores",
]

log = logging.getLogger(__name__)

CAP_RULES = ("luna16", "first")
LUNA_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CANDIDATE_FP_BUDGET = 20.0  # FP candidates per scan a second (classification) stage can afford
# Band edges for per-size sensitivity.  LUNA16 nodules start at 3 mm and those under 4 mm are
# where detectors differ most; 6 mm is the Fleischner / Lung-RADS follow-up cut; 10 and 20 mm
# split the larger, rarer ones.
DIAMETER_BANDS_MM = (4.0, 6.0, 10.0, 20.0)

# Largest (bootstrap replicates x scored events) block handled at once; bounds memory to ~100 MB.
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True, eq=False)
class Finding:
    """An annotated nodule or excluded finding: centre (3,) float64 in mm and diameter in mm."""

    center_xyz: np.ndarray
    diameter_mm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_xyz", _as_xyz(self.center_xyz))
        object.__setattr__(self, "diameter_mm", float(self.diameter_mm))
        if not math.isfinite(self.diameter_mm):
            raise DataError(f"a finding's diameter must be finite, got {self.diameter_mm}")


@dataclass(frozen=True, eq=False)
class Mark:
    """One CAD mark: centre (3,) float64 in mm and a score (higher = more nodule-like)."""

    center_xyz: np.ndarray
    probability: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_xyz", _as_xyz(self.center_xyz))
        object.__setattr__(self, "probability", float(self.probability))
        if not math.isfinite(self.probability):
            raise DataError(f"a mark's probability must be finite, got {self.probability}")


def _as_xyz(value: Any) -> np.ndarray:
    xyz = np.asarray(value, dtype=np.float64)
    if xyz.shape != (3,):
        raise DataError(f"a centre needs 3 coordinates (x, y, z), got shape {xyz.shape}")
    if not np.all(np.isfinite(xyz)):
        raise DataError(f"a centre must have finite coordinates, got {xyz.tolist()}")
    return xyz


# --------------------------------------------------------------------------- from the CSVs


def findings_by_series(nodules: Iterable[Nodule]) -> dict[str, list[Finding]]:
    """Nodules (or excluded findings) as the scorer's findings, grouped by series."""
    findings: dict[str, list[Finding]] = {}
    for nodule in nodules:
        findings.setdefault(nodule.series_uid, []).append(
            Finding(np.asarray(nodule.center_xyz), nodule.diameter_mm))
    return findings


def marks_by_series(marks: Iterable[SubmissionMark]) -> dict[str, list[Mark]]:
    """Submission rows as the scorer's marks, grouped by series (file order kept)."""
    grouped: dict[str, list[Mark]] = {}
    for mark in marks:
        grouped.setdefault(mark.series_uid, []).append(
            Mark(np.asarray(mark.center_xyz), mark.probability))
    return grouped


def load_findings(path: str | os.PathLike, *, excluded: bool = False
                  ) -> dict[str, list[Finding]]:
    """Findings per series from annotations.csv, annotations_with_malignancy.csv or (with
    ``excluded``) annotations_excluded.csv; see :func:`lunaseg.luna.read_nodules`."""
    return findings_by_series(read_nodules(path, excluded=excluded))


def load_marks(path: str | os.PathLike) -> dict[str, list[Mark]]:
    """Marks per series from a submission CSV; see :func:`lunaseg.luna.read_marks`."""
    return marks_by_series(read_marks(path))


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True, eq=False)
class Matches:
    """Which marks of one scan hit which nodules, in the order the marks were given.

    ``hits`` is (M, N) bool: mark m lies within nodule n.  ``on_excluded`` is (M,) bool: mark m
    hits no nodule but lies within an excluded finding (so it is ignored).
    """

    hits: np.ndarray
    on_excluded: np.ndarray

    @property
    def is_fp(self) -> np.ndarray:
        """(M,) bool: marks that count as false positives."""
        return ~self.hits.any(axis=1) & ~self.on_excluded

    @property
    def nodule_hit(self) -> np.ndarray:
        """(N,) bool: nodules hit by at least one mark."""
        return self.hits.any(axis=0)

    def nodule_best(self, probabilities: np.ndarray) -> np.ndarray:
        """(N,) float: best probability of the marks hitting each nodule (NaN if none)."""
        scores = np.where(self.hits, np.asarray(probabilities, dtype=np.float64)[:, None], -np.inf)
        best = scores.max(axis=0, initial=-np.inf)
        return np.where(np.isfinite(best), best, np.nan)


def _centers(items: Sequence[Finding] | Sequence[Mark]) -> np.ndarray:
    if not items:
        return np.zeros((0, 3))
    return np.stack([item.center_xyz for item in items])


def _scored_diameters(findings: Sequence[Finding]) -> np.ndarray:
    """Diameters as scored: a negative one (size unknown) counts as 10 mm."""
    return np.array([f.diameter_mm if f.diameter_mm >= 0 else UNKNOWN_DIAMETER_SCORED_MM
                     for f in findings], dtype=np.float64)


def _within(points: np.ndarray, centers: np.ndarray, diameters: np.ndarray) -> np.ndarray:
    """(P, C) bool: point p lies within the sphere of centre c (distance < diameter / 2)."""
    squared = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return squared < (diameters[None, :] / 2.0) ** 2


def match_marks(nodules: Sequence[Finding], marks: Sequence[Mark], *,
                excluded: Sequence[Finding] = ()) -> Matches:
    """Match one scan's marks against its nodules and excluded findings (no cap, no sorting)."""
    points = _centers(marks)
    hits = _within(points, _centers(nodules), _scored_diameters(nodules))
    in_excluded = _within(points, _centers(excluded), _scored_diameters(excluded)).any(axis=1)
    return Matches(hits=hits, on_excluded=in_excluded & ~hits.any(axis=1))


# --------------------------------------------------------------------------- results


@dataclass
class NoduleRecord:
    """How one nodule fared, so callers can list misses.

    ``rank`` is the 1-based place of its best mark among all its scan's marks sorted by
    probability (uncapped), ``best_probability`` that mark's score; both None when no mark hits it.
    ``hit`` means it is scored (best mark within the cap); ``hit_any`` ignores the cap.
    """

    series_uid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    hit: bool
    hit_any: bool
    best_probability: float | None
    rank: int | None


@dataclass(frozen=True)
class SizeBand:
    """Sensitivities of the nodules with ``low_mm <= diameter < high_mm``."""

    low_mm: float
    high_mm: float  # inf for the last band
    nodules: int
    found: int  # hit by any candidate (the candidate-stage sensitivity)
    found_at_budget: int  # hit at the threshold where the scans hold ``fp_budget`` FPs each

    @property
    def label(self) -> str:
        return size_band_label(self.low_mm, self.high_mm)


def size_band_label(low_mm: float, high_mm: float) -> str:
    """``"< 4 mm"``, ``"4-6 mm"`` or ``">= 20 mm"``: one name for a band everywhere."""
    if low_mm <= 0:
        return f"< {high_mm:g} mm"
    if math.isinf(high_mm):
        return f">= {low_mm:g} mm"
    return f"{low_mm:g}-{high_mm:g} mm"


@dataclass
class FrocResult:
    """A scored submission.  Curve arrays have one entry per distinct probability, descending.

    ``sensitivities_at`` maps each FP rate to the sensitivity read off the curve; ``cpm`` is their
    mean; ``sensitivity_at_budget`` is the step reading at ``fp_budget`` FPs per scan, taken at
    probability ``budget_threshold`` (None when the top threshold already exceeds the budget).
    The CI fields are None without bootstrapping; ``band_*`` hold a 95% band of the curve at
    ``band_fps`` for plotting.
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivities_at: dict[float, float]
    cpm: float
    cpm_ci: tuple[float, float] | None
    sensitivities_ci: dict[float, tuple[float, float]] | None
    candidate_sensitivity: float
    fp_budget: float
    sensitivity_at_budget: float
    candidates_per_scan: float
    marks_per_scan: float
    n_nodules: int
    n_scans: int
    max_marks_per_scan: int | None
    interpolation: str
    bootstrap: int
    nodules: list[NoduleRecord] = field(default_factory=list)
    band_fps: np.ndarray | None = None
    band_lo: np.ndarray | None = None
    band_hi: np.ndarray | None = None
    budget_threshold: float | None = None

    def hit_at_budget(self, record: NoduleRecord) -> bool:
        """Whether ``record`` counts in ``sensitivity_at_budget`` (scored at or above the
        budget's threshold)."""
        return (record.hit and self.budget_threshold is not None
                and record.best_probability >= self.budget_threshold)

    def by_size(self, edges_mm: Sequence[float] = DIAMETER_BANDS_MM) -> list[SizeBand]:
        """Per-diameter sensitivities; bands without nodules are left out."""
        edges = [0.0, *sorted(float(e) for e in edges_mm), math.inf]
        bands = []
        for low, high in zip(edges[:-1], edges[1:]):
            inside = [r for r in self.nodules if low <= r.diameter_mm < high]
            if inside:
                bands.append(SizeBand(low, high, len(inside), sum(r.hit_any for r in inside),
                                      sum(self.hit_at_budget(r) for r in inside)))
        return bands

    def curve_at(self, fps_per_scan: Sequence[float]) -> np.ndarray:
        """Sensitivity read off the curve at these false positives per scan (as the CPM
        reads it, with this result's interpolation)."""
        counts = np.rint(np.append(0.0, self.fps_per_scan) * self.n_scans).astype(np.int64)
        return _read_curves(counts[None], np.append(0.0, self.sensitivity)[None],
                            np.asarray(fps_per_scan, dtype=np.float64), self.n_scans,
                            self.interpolation)[0]

    @property
    def misses(self) -> list[NoduleRecord]:
        """Nodules not scored as hits (within the mark cap)."""
        return [record for record in self.nodules if not record.hit]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: arrays become lists, NaN becomes None, rate keys become strings."""
        def ci(pair: tuple[float, float] | None) -> list[float | None] | None:
            return None if pair is None else [_finite(pair[0]), _finite(pair[1])]

        return {
            "cpm": _finite(self.cpm),
            "cpm_ci": ci(self.cpm_ci),
            "fp_rates": list(self.fp_rates),
            "sensitivities_at": {_rate_key(r): _finite(s)
                                 for r, s in self.sensitivities_at.items()},
            "sensitivities_ci": (None if self.sensitivities_ci is None else
                                 {_rate_key(r): ci(p) for r, p in self.sensitivities_ci.items()}),
            "candidate_sensitivity": _finite(self.candidate_sensitivity),
            "fp_budget": self.fp_budget,
            "sensitivity_at_budget": _finite(self.sensitivity_at_budget),
            "candidates_per_scan": _finite(self.candidates_per_scan),
            "marks_per_scan": _finite(self.marks_per_scan),
            "budget_threshold": self.budget_threshold,
            "by_size": [{"band": b.label, "low_mm": b.low_mm, "high_mm": _finite(b.high_mm),
                         "nodules": b.nodules, "found": b.found,
                         "found_at_budget": b.found_at_budget} for b in self.by_size()],
            "n_nodules": self.n_nodules,
            "n_scans": self.n_scans,
            "max_marks_per_scan": self.max_marks_per_scan,
            "interpolation": self.interpolation,
            "bootstrap": self.bootstrap,
            "curve": {
                "fps_per_scan": _floats(self.fps_per_scan),
                "sensitivity": _floats(self.sensitivity),
                "thresholds": _floats(self.thresholds),
            },
            "band": (None if self.band_fps is None else {
                "fps_per_scan": _floats(self.band_fps),
                "lo": _floats(self.band_lo), "hi": _floats(self.band_hi)}),
            "nodules": [{
                "series_uid": r.series_uid, "center_xyz": list(r.center_xyz),
                "diameter_mm": r.diameter_mm, "hit": r.hit, "hit_any": r.hit_any,
                "hit_at_budget": self.hit_at_budget(r),
                "best_probability": r.best_probability, "rank": r.rank,
            } for r in self.nodules],
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _floats(values: np.ndarray | None) -> list[float | None]:
    return [] if values is None else [_finite(v) for v in np.asarray(values, dtype=float).tolist()]


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


# --------------------------------------------------------------------------- FROC


@dataclass(frozen=True)
class _Events:
    """Everything that moves along the FROC curve, sorted by probability (descending).

    Events are FP marks and scored nodules (one per nodule, at its best probability).
    ``ends`` index the last event of each group of equal probability: one curve point per group.
    """

    probability: np.ndarray  # (E,) float64, descending
    scan: np.ndarray  # (E,) int64, index into the evaluated scans
    is_fp: np.ndarray  # (E,) bool; False = a nodule reaches sensitivity here
    ends: np.ndarray  # (K,) int64
    nodule_scan: np.ndarray  # (N,) int64, scan of every nodule (hit or not), for denominators


def _cumulative(weights: np.ndarray, scan: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Weighted running count (B, len(columns)) of events in ``scan``, read after ``columns``.

    Column value c means "after the first c events"; c = 0 is the empty count.
    """
    running = np.zeros((weights.shape[0], scan.size + 1), dtype=weights.dtype)
    np.cumsum(weights[:, scan], axis=1, out=running[:, 1:])
    return running[:, columns]


def _curves(events: _Events,
            weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP counts and sensitivity (B, K + 1), and nodule counts (B,), for multiplicities (B, S).

    Column 0 is the curve's origin (0, 0), the others the K thresholds.  FPs and nodules are
    counted separately (FPs are most events), and FP counts stay integers so that reading the
    curve at an FP rate compares exactly.
    """
    fp_after = np.concatenate([[0], np.cumsum(events.is_fp)[events.ends]])
    tp_after = np.concatenate([[0], np.cumsum(~events.is_fp)[events.ends]])
    fp = _cumulative(weights, events.scan[events.is_fp], fp_after)
    tp = _cumulative(weights, events.scan[~events.is_fp], tp_after)
    n_nodules = weights[:, events.nodule_scan].sum(axis=1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / n_nodules[:, None]
    return fp, sensitivity, n_nodules


def _read_curves(counts: np.ndarray, sens: np.ndarray, rates: np.ndarray, n_scans: int,
                 interpolation: str) -> np.ndarray:
    """Sensitivity (B, R) at FP ``rates`` (R,) from curves (B, K + 1) that start at (0, 0).

    Each row's integer FP count is non-decreasing.  ``i`` is the last point with at most
    rate * scans FPs: the highest sensitivity reachable at that rate; a linear reading joins it
    to the next point.
    """
    b, k = counts.shape[0], counts.shape[1] - 1
    counts = counts.astype(np.int64, copy=False)
    budget = rates * n_scans  # (R,) FPs allowed at each rate, in the same units as counts
    # Nudge before flooring so 0.29 * 100 = 28.999999999999996 allows 29 FPs.
    allowed = np.floor(budget + 1e-9).astype(np.int64)
    exact = np.abs(budget - allowed) < 1e-9
    # One searchsorted for all rows: shifting row r by r * (max + 1) keeps the flat array sorted.
    stride = max(int(counts[:, -1].max()), int(allowed.max())) + 1
    offsets = (np.arange(b, dtype=np.int64) * stride)[:, None]
    flat = (counts + offsets).ravel()
    found = np.searchsorted(flat, (allowed[None, :] + offsets).ravel(), side="right")
    i = found.reshape(b, -1) - 1 - np.arange(b)[:, None] * (k + 1)  # (B, R); >= 0 as rates > 0
    at_i = np.take_along_axis(sens, i, axis=1)
    if interpolation == "step":
        return at_i
    j = np.minimum(i + 1, k)
    x0 = np.take_along_axis(counts, i, axis=1)
    x1 = np.take_along_axis(counts, j, axis=1)
    y1 = np.take_along_axis(sens, j, axis=1)
    # Past the end, or exactly on a point: no blend.
    between = (j > i) & ~(exact[None, :] & (x0 == allowed[None, :]))
    with np.errstate(invalid="ignore", divide="ignore"):
        blended = at_i + (y1 - at_i) * (budget[None, :] - x0) / (x1 - x0)
    return np.where(between, blended, at_i)


def _to_generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def cap_marks(probabilities: np.ndarray, cap: int | None, rule: str = "luna16") -> int:
    """How many of a scan's marks, sorted by probability (descending), are scored.

    ``"luna16"``: those strictly above the probability of the mark just past the cap, so
    marks tied at the cut are all dropped; ``"first"``: exactly ``cap`` (the earlier marks
    win ties).  ``cap`` None scores every mark.
    """
    if rule not in CAP_RULES:
        raise ConfigError(f"cap_rule must be one of {', '.join(CAP_RULES)}, got {rule!r}")
    count = len(probabilities)
    if cap is None or count <= cap:
        return count
    if rule == "first":
        return cap
    cut = probabilities[cap]
    return int(np.count_nonzero(np.asarray(probabilities[:cap]) > cut))


def froc(annotations: Mapping[str, Sequence[Finding]],
         candidates: Mapping[str, Sequence[Mark]], *,
         excluded: Mapping[str, Sequence[Finding]] | None = None,
         series: Iterable[str] | None = None,
         max_marks_per_scan: int | None = LUNA16_MAX_MARKS,
         cap_rule: str = "luna16",
         fp_rates: Sequence[float] = LUNA_FP_RATES,
         fp_budget: float = CANDIDATE_FP_BUDGET,
         interpolation: Literal["linear", "step"] = "linear",
         bootstrap: int = 1000,
         rng: int | np.random.Generator | None = 0) -> FrocResult:
    """Score marks against nodules the LUNA16 way (see the module docstring for the rules).

    ``series`` lists the scans evaluated (default: every series with a nodule or a mark); a scan
    without nodules still adds its FPs and counts in the per-scan denominator, and nodules or marks
    of series outside the list are ignored.  ``max_marks_per_scan=None`` scores every mark;
    ``cap_rule`` chooses how ties at the cap are cut (:func:`cap_marks`).
    ``bootstrap`` resamples scans with replacement that many times for 95% percentile intervals
    (0 skips them).  ``rng`` (int or Generator) makes the intervals reproducible.
    """
    rates = np.asarray(fp_rates, dtype=np.float64).reshape(-1)
    if rates.size == 0 or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ConfigError(f"fp_rates must be positive numbers, got {list(fp_rates)}")
    if not (math.isfinite(fp_budget) and fp_budget > 0):
        raise ConfigError(f"fp_budget must be a positive number, got {fp_budget}")
    if max_marks_per_scan is not None and max_marks_per_scan < 1:
        raise ConfigError(f"max_marks_per_scan must be >= 1 or None, got {max_marks_per_scan}")
    if cap_rule not in CAP_RULES:
        raise ConfigError(f"cap_rule must be one of {', '.join(CAP_RULES)}, got {cap_rule!r}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0, got {bootstrap}")
    if interpolation not in ("linear", "step"):
        raise ConfigError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
    excluded = excluded or {}
    uids = sorted(set(annotations) | set(candidates)) if series is None else sorted(set(series))
    if not uids:
        raise DataError("froc: no scans to evaluate (no annotations, marks or series given)")
    cap = max_marks_per_scan
    if series is not None:
        # A submission for another split is a common slip; say so rather than score silently.
        evaluated = set(uids)
        ignored = sum(len(marks) for uid, marks in candidates.items() if uid not in evaluated)
        if ignored:
            log.warning("froc: ignored %d marks in series outside the %d evaluated", ignored,
                        len(uids))

    ev_prob: list[np.ndarray] = []
    ev_scan: list[np.ndarray] = []
    ev_fp: list[np.ndarray] = []
    nodule_scan: list[int] = []
    records: list[NoduleRecord] = []
    n_marks = n_scored = tie_dropped = tie_scans = 0
    for s, uid in enumerate(uids):
        nodules = list(annotations.get(uid, ()))
        marks = list(candidates.get(uid, ()))
        n_marks += len(marks)
        probs = np.array([m.probability for m in marks], dtype=np.float64)
        # Stable sort: of equal probabilities the earlier mark ranks first (and survives the cap).
        order = np.argsort(-probs, kind="stable")
        marks = [marks[k] for k in order]
        probs = probs[order]
        matches = match_marks(nodules, marks, excluded=list(excluded.get(uid, ())))
        kept = cap_marks(probs, cap, cap_rule)
        if cap is not None and len(marks) > cap and kept < cap:
            tie_dropped += cap - kept
            tie_scans += 1
        n_scored += kept
        fp = matches.is_fp[:kept]
        hit_probs = []
        for n, nodule in enumerate(nodules):
            # Marks are sorted, so the first hitting mark is the best one and gives the rank.
            hitting = np.flatnonzero(matches.hits[:, n])
            rank = int(hitting[0]) + 1 if hitting.size else None
            scored = rank is not None and rank <= kept
            if scored:
                hit_probs.append(probs[rank - 1])
            nodule_scan.append(s)
            records.append(NoduleRecord(
                series_uid=uid, center_xyz=tuple(float(v) for v in nodule.center_xyz),
                diameter_mm=nodule.diameter_mm, hit=scored, hit_any=rank is not None,
                best_probability=None if rank is None else float(probs[rank - 1]), rank=rank))
        ev_prob += [probs[:kept][fp], np.array(hit_probs, dtype=np.float64)]
        ev_fp += [np.ones(int(fp.sum()), dtype=bool), np.zeros(len(hit_probs), dtype=bool)]
        ev_scan.append(np.full(int(fp.sum()) + len(hit_probs), s, dtype=np.int64))

    if tie_dropped:
        log.warning("froc: in %d scan(s), marks tied at the %d-mark cut left %d of the %d "
                    "places empty (LUNA16 drops every mark tied with the first one past the "
                    "cap)", tie_scans, cap, tie_dropped, cap * tie_scans)
    probability = np.concatenate(ev_prob)
    scan = np.concatenate(ev_scan)
    is_fp = np.concatenate(ev_fp)
    order = np.argsort(-probability, kind="stable")
    probability, scan, is_fp = probability[order], scan[order], is_fp[order]
    # A group of equal probabilities ends where the next event's probability is lower.
    ends = np.flatnonzero(np.append(probability[1:] != probability[:-1], True)) \
        if probability.size else np.zeros(0, dtype=np.int64)
    events = _Events(probability, scan, is_fp, ends, np.array(nodule_scan, dtype=np.int64))

    n_scans = len(uids)
    fp_counts, sens, _ = _curves(events, np.ones((1, n_scans), dtype=np.int64))
    at = _read_curves(fp_counts, sens, rates, n_scans, interpolation)[0]
    at_budget = float(_read_curves(fp_counts, sens, np.array([float(fp_budget)]), n_scans,
                                   "step")[0, 0])
    # The step reading's point: the last one within the budget (column 0 is the origin).
    allowed = math.floor(float(fp_budget) * n_scans + 1e-9)
    point = int(np.searchsorted(fp_counts[0], allowed, side="right")) - 1
    budget_threshold = float(probability[ends[point - 1]]) if point > 0 else None
    if not records:
        at[:] = np.nan  # no nodules: sensitivity is undefined, not zero
        at_budget = float("nan")
    result = FrocResult(
        fps_per_scan=fp_counts[0, 1:] / n_scans, sensitivity=sens[0, 1:],
        thresholds=probability[ends],
        fp_rates=tuple(float(r) for r in rates),
        sensitivities_at={float(r): float(v) for r, v in zip(rates, at)},
        cpm=float(at.mean()), cpm_ci=None, sensitivities_ci=None,
        candidate_sensitivity=(float(np.mean([r.hit_any for r in records]))
                               if records else float("nan")),
        fp_budget=float(fp_budget), sensitivity_at_budget=at_budget,
        candidates_per_scan=n_marks / n_scans, marks_per_scan=n_scored / n_scans,
        n_nodules=len(records), n_scans=n_scans, max_marks_per_scan=cap,
        interpolation=interpolation, bootstrap=bootstrap, nodules=records,
        budget_threshold=budget_threshold)
    if bootstrap:
        _add_bootstrap(result, events, rates, interpolation, bootstrap, _to_generator(rng))
    return result


def _add_bootstrap(result: FrocResult, events: _Events, rates: np.ndarray, interpolation: str,
                   bootstrap: int, rng: np.random.Generator) -> None:
    """Fill the CI fields: resample scans, re-read sensitivities, take 2.5/97.5 percentiles."""
    n_scans = result.n_scans
    lo_fps = min(float(rates.min()), 0.125)
    hi_fps = max(float(rates.max()), 8.0)
    band_fps = np.geomspace(lo_fps, hi_fps, 49)
    grid = np.concatenate([rates, band_fps])
    # Draw all replicates first so the result does not depend on the block size.
    draws = rng.integers(0, n_scans, size=(bootstrap, n_scans))
    block = max(1, _BLOCK_ELEMENTS // max(1, events.probability.size, n_scans))
    readings = []
    for start in range(0, bootstrap, block):
        chunk = draws[start:start + block]
        b = chunk.shape[0]
        # Multiplicity of each scan in each replicate, via one bincount over offset indices.
        flat = (chunk + (np.arange(b) * n_scans)[:, None]).ravel()
        # int32 halves the memory traffic of the running sums; counts stay far below 2**31.
        weights = np.bincount(flat, minlength=b * n_scans).reshape(b, n_scans).astype(np.int32)
        fp_counts, sens, n_nodules = _curves(events, weights)
        reading = _read_curves(fp_counts, sens, grid, n_scans, interpolation)
        reading[n_nodules == 0] = np.nan
        readings.append(reading)
    values = np.concatenate(readings)  # (B, R + band)
    at = values[:, :rates.size]
    # A replicate that drew no nodule-bearing scan has no sensitivity; it is left out.
    valid = ~np.isnan(at).any(axis=1)
    if not valid.any():
        return
    at = at[valid]
    lo, hi = np.percentile(at, [2.5, 97.5], axis=0)
    cpm_lo, cpm_hi = np.percentile(at.mean(axis=1), [2.5, 97.5])
    result.cpm_ci = (float(cpm_lo), float(cpm_hi))
    result.sensitivities_ci = {float(r): (float(a), float(b))
                               for r, a, b in zip(rates, lo, hi)}
    band_lo, band_hi = np.percentile(values[valid, rates.size:], [2.5, 97.5], axis=0)
    result.band_fps, result.band_lo, result.band_hi = band_fps, band_lo, band_hi


# --------------------------------------------------------------------------- malignancy


def found_nodule_scores(nodules: Sequence[Finding], marks: Sequence[Mark],
                        scores: Sequence[float | None]) -> list[float | None]:
    """Per nodule, ``scores[m]`` of the highest-probability mark m that hits it (the mark the
    FROC scores it by; the earlier mark on a tie), None when no mark hits it or that mark has
    no score.  ``scores`` runs parallel to ``marks``."""
    if len(scores) != len(marks):
        raise ValueError(f"{len(scores)} scores for {len(marks)} marks")
    hits = match_marks(nodules, marks).hits
    probabilities = np.array([m.probability for m in marks], dtype=np.float64)
    out: list[float | None] = []
    for n in range(len(nodules)):
        hitting = np.flatnonzero(hits[:, n])
        if not hitting.size:
            out.append(None)
            continue
        best = hitting[np.argmax(probabilities[hitting])]  # argmax keeps the first of a tie
        out.append(None if scores[best] is None else float(scores[best]))
    return out


# --------------------------------------------------------------------------- output


def write_result_json(result: FrocResult, path: str | os.PathLike) -> Path:
    """Write ``result.to_dict()`` as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    write_text_atomic(text, path)
    return path
