"""The whole CAD on a scan: the U-Net's candidates, each judged by the nodule classifier
(and a malignancy model), ranked by the classifier.

The classifier's verdict is kept as log-odds, which do not saturate, and candidates it
cannot tell apart keep the candidate stage's order, so the ranking written to the LUNA16
submission is the models' real order (as for the candidate stage, see lunaseg.candidates).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lunaseg.candidates import NODULE_THRESHOLD, Candidate
from lunaseg.classifier import SharedTrunk, load_classifier, shares_trunk
from lunaseg.classify import (candidate_crops, candidate_log_odds, crop_logits, log_odds,
                              resolve_classifier_spec)
from lunaseg.config import SegmentConfig
from lunaseg.ct import CT
from lunaseg.errors import ConfigError
from lunaseg.evaluate import Finding
from lunaseg.runtime import resolve_device
from lunaseg.segment import ScanOutput, SegmentResult, segment_ct, segment_inputs

__all__ = ["NODULE_THRESHOLD", "RANKINGS", "rank_by_classifier", "ranking_log_odds",
           "detect_ct", "detect_inputs", "load_stage_two", "kept"]

# How judged candidates are ordered: by the classifier's log-odds alone, or by their sum
# with the candidate stage's score (a logit too): two detectors' evidence added, as for
# independent likelihood ratios, so a weak classifier cannot undo a strong candidate stage.
RANKINGS = ("classifier", "combined")


def ranking_log_odds(score: float, nodule_log_odds: float, rank_by: str) -> float:
    """The value judged candidates are ordered by (and written as, through
    :func:`lunaseg.candidates.score_probability`)."""
    if rank_by not in RANKINGS:
        raise ConfigError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    return nodule_log_odds + (score if rank_by == "combined" else 0.0)


def _check_classes(model: nn.Module, wanted: str, what: str) -> None:
    """A classifier whose last class is not ``wanted`` would be read the wrong way round."""
    classes = getattr(getattr(model, "config", None), "classes", None)
    if classes is not None and classes[-1] != wanted:
        raise ConfigError(f"{what}: its last class is {classes[-1]!r}, expected {wanted!r} "
                          f"(classes {', '.join(classes)})")


def load_stage_two(classifier: nn.Module | str | os.PathLike,
                   malignancy: nn.Module | str | os.PathLike | None = None, *,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module | None]:
    """The nodule classifier and the optional malignancy model, loaded when given as paths
    (lunaseg's checkpoints or the book's) and checked to answer the right question."""
    models = []
    for model, wanted, what in ((classifier, "nodule", "nodule classifier"),
                                (malignancy, "malignant", "malignancy model")):
        if model is not None and not isinstance(model, nn.Module):
            what = str(model)
            model, _ = load_classifier(model, device=device)
        if model is not None:
            _check_classes(model, wanted, what)
        models.append(model)
    return models[0], models[1]


def rank_by_classifier(ct: CT, result: SegmentResult, classifier: nn.Module,
                       malignancy: nn.Module | None = None, *, rank_by: str = "classifier",
                       batch_size: int = 0, device: str | torch.device = "cpu",
                       amp: bool = False) -> SegmentResult:
    """``result`` with every candidate judged by ``classifier`` (and ``malignancy``),
    re-ranked as ``rank_by`` says (:data:`RANKINGS`), ties in the candidate stage's order;
    the label map follows the new ranks.  ``ct`` is the scan ``result`` was found on."""
    ranking_log_odds(0.0, 0.0, rank_by)  # a bad name fails before any work
    start = time.perf_counter()
    candidates = result.candidates
    resample = result.settings.resample  # --native-pixels feeds both stages native pixels
    spec = resolve_classifier_spec(classifier, None)
    crops = candidate_crops(ct, candidates, spec, resample)
    if malignancy is not None and len(candidates) and shares_trunk(classifier, malignancy):
        # Fine-tuned from this classifier at depth 1: its features once, both heads on them.
        logits = crop_logits(SharedTrunk(classifier, malignancy), crops, spec=spec,
                             batch_size=batch_size, device=device, amp=amp)
        n_classes = classifier.head_linear.out_features
        nodule, malignant = log_odds(logits[:, :n_classes]), log_odds(logits[:, n_classes:])
    else:
        nodule = candidate_log_odds(classifier, ct, candidates, batch_size=batch_size,
                                    device=device, amp=amp, crops=crops)
        malignant = [None] * len(candidates)
        if malignancy is not None:
            # One of the classifier's spec (any fine-tuning) takes the same crops.
            same = resolve_classifier_spec(malignancy, None) == spec
            malignant = candidate_log_odds(malignancy, ct, candidates, batch_size=batch_size,
                                           device=device, amp=amp, resample=resample,
                                           crops=crops if same else None)
    # The classifier's verdicts replace a 3-class U-Net's; without a malignancy model the
    # U-Net's p(malignant | nodule), if it gave one, stays.
    judged = [replace(c, nodule_log_odds=float(n),
                      malignant_log_odds=c.malignant_log_odds if m is None else float(m),
                      rank_log_odds=ranking_log_odds(c.score, float(n), rank_by))
              for c, n, m in zip(candidates, nodule, malignant)]
    # Stable: equal values keep the candidate stage's order (its rank).
    order = sorted(range(len(judged)), key=lambda k: -judged[k].rank_log_odds)
    relabel = np.zeros(len(judged) + 1, dtype=result.labels.dtype)
    ranked = []
    for new_rank, k in enumerate(order):
        relabel[judged[k].rank + 1] = new_rank + 1
        ranked.append(replace(judged[k], rank=new_rank))
    seconds = time.perf_counter() - start
    return replace(result, labels=relabel[result.labels], candidates=ranked,
                   seconds=result.seconds + seconds, classify_seconds=seconds)


def detect_ct(seg_model: nn.Module, classifier: nn.Module, ct: CT,
              config: SegmentConfig | None = None, *, malignancy: nn.Module | None = None,
              rank_by: str = "classifier", device: str | torch.device | None = None,
              progress: bool = False) -> SegmentResult:
    """Candidates of one CT (:func:`lunaseg.segment.segment_ct`), judged and ranked by the
    classifier (:func:`rank_by_classifier`)."""
    config = config or SegmentConfig()
    device = resolve_device(config.device if device is None else device)
    result = segment_ct(seg_model, ct, config, device=device, progress=progress)
    return rank_by_classifier(ct, result, classifier, malignancy, rank_by=rank_by,
                              device=device, amp=config.amp)


def detect_inputs(inputs: Sequence[str | os.PathLike], seg_model: nn.Module | str | os.PathLike,
                  classifier: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                  config: SegmentConfig | None = None, *,
                  malignancy: nn.Module | str | os.PathLike | None = None,
                  rank_by: str = "classifier", series_uids: Sequence[str] | None = None,
                  device: str | torch.device | None = None, require_ct: bool = True,
                  overwrite: bool = False,
                  annotations: Mapping[str, Sequence[Finding]] | None = None,
                  progress: bool = True) -> list[ScanOutput]:
    """``segment_inputs`` with the second stage: each scan's candidates judged and ranked
    by the classifier before they are written; the CSVs and the report carry p(nodule) and
    p(malignant), the submission the classifier's probability."""
    config = config or SegmentConfig()
    device = resolve_device(config.device if device is None else device)
    names = {"classifier": _name(classifier), "malignancy": _name(malignancy),
             "rank_by": rank_by}
    classifier, malignancy = load_stage_two(classifier, malignancy, device=device)
    ranking_log_odds(0.0, 0.0, rank_by)
    stage_two = functools.partial(rank_by_classifier, classifier=classifier,
                                  malignancy=malignancy, rank_by=rank_by, device=device,
                                  amp=config.amp)
    return segment_inputs(inputs, seg_model, out_dir, config, series_uids=series_uids,
                          device=device, require_ct=require_ct, overwrite=overwrite,
                          annotations=annotations, progress=progress, stage_two=stage_two,
                          stage_two_models=names)


def _name(model: nn.Module | str | os.PathLike | None) -> str | None:
    if model is None:
        return None
    return type(model).__name__ if isinstance(model, nn.Module) else str(model)


def kept(candidates: Sequence[Candidate], threshold: float = NODULE_THRESHOLD) -> int:
    """How many candidates the classifier calls nodules."""
    return sum(1 for c in candidates if c.p_nodule is not None and c.p_nodule >= threshold)

