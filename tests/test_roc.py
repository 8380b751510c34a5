"""ROC AUC and its bootstrap interval (lunaseg.roc), checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lunaseg.classifier_metrics import roc_auc as classifier_roc_auc
from lunaseg.roc import roc_auc, roc_auc_interval


def test_roc_auc_by_hand():
    # Positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9 > 0.5, 0.9 > 0.1, 0.4 < 0.5,
    # 0.4 > 0.1) -> 3 of 4.
    assert roc_auc([True, False, True, False], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    # A tie counts half: positive 0.5 against negative 0.5.
    assert roc_auc([True, False, True], [0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert roc_auc([False, True], [0.1, 0.2]) == 1.0
    assert roc_auc([True, False], [0.1, 0.2]) == 0.0
    assert np.isnan(roc_auc([True, True], [0.1, 0.2]))
    with pytest.raises(ValueError, match="differ"):
        roc_auc([True, False], [0.1])


def test_the_classifier_metrics_rate_with_the_same_function():
    assert classifier_roc_auc is roc_auc


def test_roc_auc_interval_brackets_the_auc():
    rng = np.random.default_rng(0)
    labels = rng.random(80) < 0.4
    scores = labels * 0.6 + rng.random(80)
    auc = roc_auc(labels, scores)
    low, high = roc_auc_interval(labels, scores, replicates=400)
    assert low < auc < high and 0.5 < low and high <= 1.0
    assert roc_auc_interval([True, False, False], [0.1, 0.2, 0.3]) is None  # one positive
    # The same seed, the same interval.
    assert roc_auc_interval(labels, scores, replicates=50, rng=3) == \
        roc_auc_interval(labels, scores, replicates=50, rng=3)
