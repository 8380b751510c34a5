"""Validating a segmentation model the way it is used: candidates on whole validation scans,
grouped and scored as ``segment`` and ``evaluate`` do, so "best" means best for candidates.

Pixel metrics on nodule slices (the book's) say little about candidates: a model can raise
pixel recall by marking every vessel.  This runs the network over each cached validation
scan (around the lungs), extracts candidates with the model's grouping and scores them
against the cached nodules the LUNA16 way.  A 3-class model's candidates are also rated by
their p(malignant | nodule) (``Candidate.p_malignant``, what the malignancy classifier gives
too) against the found nodules' malignancy (``cand/malignancy_auc``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lunaseg.cache import Cache, SeriesCache
from lunaseg.candidates import label_candidates
from lunaseg.config import SegmentConfig
from lunaseg.ct import CT
from lunaseg.evaluate import CANDIDATE_FP_BUDGET, Finding, Mark, found_nodule_scores, froc
from lunaseg.geometry import Geometry
from lunaseg.predict import predict_ct
from lunaseg.roc import roc_auc

__all__ = ["candidate_marks", "score_candidates", "cached_ct", "CANDIDATE_TAGS"]

# TensorBoard tags of what score_candidates returns (beside the book's pixel tags).
CANDIDATE_TAGS = ("cand/sensitivity", "cand/sensitivity_at_budget", "cand/cpm",
                  "cand/per_scan", "cand/malignancy_auc")

# Per series of a 3-class model: each nodule's malignancy, each mark's p(malignant | nodule).
MalignancyScores = dict[str, tuple[list[bool], list[float]]]


def cached_ct(entry: SeriesCache) -> CT:
    """A cache entry's (body-cropped, canonical) volume as a CT with its own geometry."""
    row0, col0 = entry.crop_rc
    full = entry.geometry
    origin = full.irc_to_xyz(np.array([0.0, row0, col0]))
    return CT(np.asarray(entry.hu), Geometry(origin, full.spacing_xyz, full.direction),
              entry.series_uid)


def candidate_marks(model: nn.Module, cache: Cache, series_uids: list[str],
                    device: torch.device, *, tta: int = 1, amp: bool = False
                    ) -> tuple[dict[str, list[Finding]], dict[str, list[Mark]], list[int],
                               MalignancyScores]:
    """The cached nodules, the submission marks, the candidate count and (3-class models;
    else empty) the malignancy scores of ``model`` on each of ``series_uids`` (``tta``
    views: one keeps validation cheap; ``segment`` uses the model's; ``amp``: bf16, as a
    run that trains in it validates)."""
    config = SegmentConfig(tta=tta, amp=amp, overlays=0, write_volumes=False,
                           device=str(device))
    findings: dict[str, list[Finding]] = {}
    marks: dict[str, list[Mark]] = {}
    malignancy: MalignancyScores = {}
    counts = []
    was_training = model.training
    for uid in series_uids:
        entry = cache[uid]
        ct = cached_ct(entry)
        logits, lungs, malignancy_logits = predict_ct(model, ct, config, device=device)
        candidates, _ = label_candidates(logits, ct.hu, ct.geometry, config,
                                         grouping=model.spec.grouping, lung_mask=lungs,
                                         malignancy_logits=malignancy_logits)
        counts.append(len(candidates))
        kept = candidates[:config.max_candidates]
        marks[uid] = [Mark(np.asarray(c.center_xyz), c.probability) for c in kept]
        findings[uid] = [Finding(np.asarray(n.center_xyz), n.diameter_mm)
                         for n in entry.nodules]
        if malignancy_logits is not None:
            malignancy[uid] = ([n.is_malignant for n in entry.nodules],
                               [c.p_malignant for c in kept])
    model.train(was_training)
    return findings, marks, counts, malignancy


def score_candidates(findings: dict[str, list[Finding]], marks: dict[str, list[Mark]],
                     counts: list[int], malignancy: MalignancyScores | None = None, *,
                     fp_budget: float = CANDIDATE_FP_BUDGET) -> dict[str, float]:
    """Candidate sensitivity, sensitivity within ``fp_budget`` false positives per scan,
    CPM and candidates per scan, under :data:`CANDIDATE_TAGS`; with ``malignancy`` also
    the ROC AUC of p(malignant | nodule) on the nodules found (absent when the nodules
    found are all of one class)."""
    if not findings:
        return {}
    result = froc(findings, marks, series=sorted(findings),
                  max_marks_per_scan=SegmentConfig().max_candidates, fp_budget=fp_budget,
                  bootstrap=0)

    def finite(value: float) -> float:
        return float(value) if np.isfinite(value) else 0.0

    scores = {"cand/sensitivity": finite(result.candidate_sensitivity),
              "cand/sensitivity_at_budget": finite(result.sensitivity_at_budget),
              "cand/cpm": finite(result.cpm), "cand/per_scan": float(np.mean(counts)),
              "cand_count/nodules": result.n_nodules, "cand_count/scans": result.n_scans}
    if malignancy:
        rated, labels = [], []
        for uid, (is_malignant, mark_scores) in malignancy.items():
            for flag, score in zip(is_malignant,
                                   found_nodule_scores(findings[uid], marks[uid], mark_scores)):
                if score is not None:
                    rated.append(score)
                    labels.append(flag)
        auc = roc_auc(labels, rated) if rated else float("nan")
        if np.isfinite(auc):  # left out, not faked, when the found nodules hold one class
            scores["cand/malignancy_auc"] = float(auc)
        scores["cand_count/malignancy_nodules"] = len(rated)
    return scores
