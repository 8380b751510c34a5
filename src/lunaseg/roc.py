"""ROC AUC of scores against bool labels, and its bootstrap interval: the one malignancy
(and classifier) figure every stage is rated by.

The classifier's epoch metrics, validation's ``cand/malignancy_auc`` of a 3-class U-Net and
bench_heldout's malignancy rows all call these, so the same nodules scored by different
models give comparable numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["roc_auc", "roc_auc_interval"]


def roc_auc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for bool ``labels``; NaN without both classes.

    The probability that a random positive scores above a random negative, ties counting
    half (the Mann-Whitney U statistic over average ranks), which equals the trapezoidal area
    under the ROC curve through every threshold.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    # Average 1-based rank of every run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], labels.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_auc_interval(labels: Sequence[bool] | np.ndarray,
                     scores: Sequence[float] | np.ndarray, *, replicates: int = 2000,
                     rng: int | np.random.Generator | None = 0) -> tuple[float, float] | None:
    """95 % bootstrap interval of :func:`roc_auc`: the samples (nodules) resampled with
    replacement, replicates without both classes left out; None with fewer than two of
    either class, where an interval would say nothing."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ")
    if min(int(labels.sum()), int((~labels).sum())) < 2:
        return None
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    values = []
    for _ in range(replicates):
        pick = generator.integers(0, scores.size, scores.size)
        value = roc_auc(labels[pick], scores[pick])
        if math.isfinite(value):
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
