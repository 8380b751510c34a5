"""ROC AUC and the book's classification tags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lunaseg.classifier_metrics import ClassifierMetrics, roc_auc


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounded: many ties
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_auc_extremes_and_one_class():
    labels = np.array([0, 0, 1, 1], bool)
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.5)) == 0.5
    assert math.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))


def test_metrics_have_the_books_tags():
    metrics = ClassifierMetrics()
    label = torch.tensor([True, True, False, False, False])
    prob = torch.tensor([0.9, 0.3, 0.6, 0.1, 0.2])
    loss = torch.tensor([0.1, 1.2, 0.9, 0.1, 0.2])
    metrics.update(loss[:2], label[:2], prob[:2])
    metrics.update(loss[2:], label[2:], prob[2:])
    m = metrics.compute()
    assert m["loss/all"] == pytest.approx(0.5)
    assert m["loss/pos"] == pytest.approx(0.65) and m["loss/neg"] == pytest.approx(0.4)
    assert m["correct/all"] == pytest.approx(60.0)
    assert m["correct/pos"] == pytest.approx(50.0)
    assert m["correct/neg"] == pytest.approx(200 / 3)
    assert m["pr/precision"] == pytest.approx(0.5) and m["pr/recall"] == pytest.approx(0.5)
    assert m["pr/f1_score"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(5 / 6)
    assert (m["count/tp"], m["count/fp"], m["count/fn"], m["count/tn"]) == (1, 1, 1, 2)
