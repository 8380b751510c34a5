"""Epoch metrics of a two-class classifier: the book's TensorBoard tags and ROC AUC
(:func:`lunaseg.roc.roc_auc`, re-exported here).

Per-sample losses, labels and positive-class probabilities are gathered on their device;
:meth:`ClassifierMetrics.compute` copies them to the host once per epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from lunaseg.roc import roc_auc

__all__ = ["roc_auc", "ClassifierMetrics", "THRESHOLD"]

# A sample counts as predicted positive above this probability (the book's cut).
THRESHOLD = 0.5


class ClassifierMetrics:
    """Per-sample loss, label and p(positive) over an epoch; ``compute`` gives the tags
    ``loss/all|pos|neg``, ``correct/all|pos|neg`` (percent), ``pr/precision``,
    ``pr/recall``, ``pr/f1_score`` (the book's), ``auc`` and counts."""

    def __init__(self) -> None:
        self._loss: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []
        self._prob: list[torch.Tensor] = []

    def update(self, loss: torch.Tensor, label: torch.Tensor, prob_pos: torch.Tensor) -> None:
        """Add a batch: per-sample ``loss`` (N,), bool or 0/1 ``label`` (N,), ``prob_pos`` (N,)."""
        self._loss.append(loss.detach().float().reshape(-1))
        self._label.append(label.detach().reshape(-1).bool())
        self._prob.append(prob_pos.detach().float().reshape(-1))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss, label, p(positive)) of every sample so far, as NumPy arrays."""
        if not self._loss:
            return np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0)
        return tuple(torch.cat(part).cpu().numpy()  # type: ignore[return-value]
                     for part in (self._loss, self._label, self._prob))

    def compute(self) -> dict[str, float | int]:
        loss, label, prob = self.arrays()
        predicted = prob > THRESHOLD
        pos, neg = label, ~label
        tp = int((predicted & pos).sum())
        fp = int((predicted & neg).sum())
        fn = int((~predicted & pos).sum())
        tn = int((~predicted & neg).sum())

        def mean(values: np.ndarray) -> float:
            return float(values.mean()) if values.size else float("nan")

        def percent(hits: int, total: int) -> float:
            return 100.0 * hits / total if total else float("nan")

        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "loss/all": mean(loss), "loss/pos": mean(loss[pos]), "loss/neg": mean(loss[neg]),
            "correct/all": percent(tp + tn, label.size),
            "correct/pos": percent(tp, int(pos.sum())),
            "correct/neg": percent(tn, int(neg.sum())),
            "pr/precision": precision, "pr/recall": recall, "pr/f1_score": f1,
            "auc": roc_auc(label, prob),
            "count/tp": tp, "count/fp": fp, "count/fn": fn, "count/tn": tn,
            "samples": int(label.size),
        }
