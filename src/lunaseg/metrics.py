"""Pixel counts and running epoch metrics with the book's TensorBoard tags.

Counts stay on the device they were computed on; the only host sync is in
:meth:`SegmentationMetrics.compute`, once per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

__all__ = ["pixel_counts", "blob_counts", "SegmentationMetrics", "TP", "FN", "FP"]

log = logging.getLogger(__name__)

# Column order of pixel_counts().
TP, FN, FP = 0, 1, 2


def pixel_counts(pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample true-positive, false-negative and false-positive pixel counts.

    pred : (N, ...) float probabilities, thresholded at ``pred > threshold``;
    label : same shape, bool or float (``> 0.5`` is positive).
    Returns (N, 3) int64 on ``pred``'s device, columns TP, FN, FP.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    predicted = (pred > threshold).flatten(1)
    truth = (label if label.dtype == torch.bool else label > 0.5).flatten(1)
    tp = (predicted & truth).sum(dim=1)
    fn = (~predicted & truth).sum(dim=1)
    fp = (predicted & ~truth).sum(dim=1)
    return torch.stack([tp, fn, fp], dim=1)


def blob_counts(pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5
                ) -> torch.Tensor:
    """Per-sample object counts: nodule blobs found, nodule blobs, false-positive blobs.

    What a candidate generator is judged on, per 2D slice: a labelled blob (8-connected) is
    found when any predicted pixel touches it; a predicted blob touching no label is a false
    positive.  pred, label : (N, 1, H, W).  Returns (N, 3) int64 on the CPU (computed there
    with scipy, so call it on validation batches, not in the training loop).
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    predicted = (pred > threshold).flatten(0, -3).cpu().numpy()
    truth = (label if label.dtype == torch.bool else label > 0.5).flatten(0, -3).cpu().numpy()
    eight = np.ones((3, 3), dtype=bool)
    out = np.zeros((predicted.shape[0], 3), dtype=np.int64)
    for k, (p, t) in enumerate(zip(predicted, truth)):
        nodules, n_nodules = ndimage.label(t, eight)
        blobs, n_blobs = ndimage.label(p, eight)
        found = np.unique(nodules[p & t]).size  # labels > 0 only: p & t excludes background
        touched = np.unique(blobs[p & t]).size
        out[k] = (found, n_nodules, n_blobs - touched)
    return torch.from_numpy(out)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


class SegmentationMetrics:
    """Sum of per-sample losses and pixel counts over an epoch; ``compute`` gives the tags.

    State lives in two tensors on the device of the first :meth:`update` (or ``device``):
    ``loss_sum`` (float64 scalar; float32 on MPS, which lacks float64) and ``counts``
    (int64: TP, FN, FP, samples, then the blob counts: found, nodules, FP blobs, samples
    with blob counts).  :meth:`all_reduce` sums them over DDP ranks.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.loss_sum: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def _allocate(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=dtype, device=device)
        self.counts = torch.zeros(8, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget everything accumulated (keeps the device)."""
        if self.counts is not None:
            self.loss_sum.zero_()
            self.counts.zero_()

    def update(self, loss: torch.Tensor, counts: torch.Tensor,
               blobs: torch.Tensor | None = None) -> None:
        """Add a batch: per-sample ``loss`` (N,), ``counts`` (N, 3) from :func:`pixel_counts`
        and optionally ``blobs`` (N, 3) from :func:`blob_counts`."""
        if loss.dim() != 1 or counts.shape != (loss.shape[0], 3):
            raise ValueError(f"expected loss (N,) and counts (N, 3), got {tuple(loss.shape)} "
                             f"and {tuple(counts.shape)}")
        if blobs is not None and blobs.shape != counts.shape:
            raise ValueError(f"expected blobs (N, 3), got {tuple(blobs.shape)}")
        if self.counts is None:
            self._allocate(self.device if self.device is not None else counts.device)
        self.loss_sum += loss.detach().sum().to(self.loss_sum)
        batch = counts.detach().sum(dim=0).to(self.counts)
        self.counts[:3] += batch
        self.counts[3] += loss.shape[0]
        if blobs is not None:
            self.counts[4:7] += blobs.sum(dim=0).to(self.counts)
            self.counts[7] += loss.shape[0]

    def reduce_(self, fn: Callable[[torch.Tensor], object]) -> None:
        """Apply an in-place reduction (e.g. ``dist.all_reduce``) to each state tensor."""
        if self.counts is None:
            # Every rank must take part in a collective, even one that saw no samples.
            self._allocate(self.device if self.device is not None else torch.device("cpu"))
        fn(self.loss_sum)
        fn(self.counts)

    def all_reduce(self) -> None:
        """Sum the state over all ranks when torch.distributed is initialised; else nothing."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.reduce_(dist.all_reduce)

    def compute(self) -> dict[str, float | int]:
        """The epoch's metrics under the book's tag names, plus raw counts.

        Percentages are of labelled pixels (TP + FN), so ``percent_all/fp`` can exceed 100.
        Zero denominators give 0.0; ``loss/all`` is NaN when no sample was seen.  With blob
        counts, ``blobs/recall`` (share of labelled blobs found) and ``blobs/fp_per_slice``.
        """
        if self.counts is None:
            tp = fn = fp = samples = found = nodules = fp_blobs = blob_samples = 0
            loss_sum = 0.0
        else:
            tp, fn, fp, samples, found, nodules, fp_blobs, blob_samples = (
                int(v) for v in self.counts.tolist())
            loss_sum = float(self.loss_sum.item())
        labelled = tp + fn
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, labelled)
        return {
            "loss/all": loss_sum / samples if samples else float("nan"),
            "percent_all/tp": _ratio(tp, labelled) * 100,
            "percent_all/fn": _ratio(fn, labelled) * 100,
            "percent_all/fp": _ratio(fp, labelled) * 100,
            "pr/precision": precision,
            "pr/recall": recall,
            "pr/f1_score": _ratio(2 * precision * recall, precision + recall),
            "count/tp": tp,
            "count/fn": fn,
            "count/fp": fp,
            "samples": samples,
        } | ({
            "blobs/recall": _ratio(found, nodules),
            "blobs/fp_per_slice": _ratio(fp_blobs, blob_samples),
            "count/nodule_blobs": nodules,
            "count/fp_blobs": fp_blobs,
        } if blob_samples else {})
