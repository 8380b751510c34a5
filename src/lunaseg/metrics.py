"""Pixel counts and running epoch metrics with the book's TensorBoard tags.

Counts stay on the device they were computed on; the only host sync is in
:meth:`SegmentationMetrics.compute`, once per epoch.

A 3-class model (chapter exercise 3a) is scored twice.  The book's tags keep their meaning,
nodule vs background on the union of the nodule classes, so its recall compares with a
1-class model's.  Per class, one class against the other two, ``pr_benign/*``,
``pr_malignant/*`` and ``percent_benign/*``, ``percent_malignant/*`` say how each class is
segmented (a malignant pixel called benign is a malignant false negative and a benign false
positive), and ``confusion/*`` is benign vs malignant on the nodule pixels that were found:
what a classifier after the segmentation would be judged on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

__all__ = ["pixel_counts", "class_pixel_counts", "predicted_classes", "blob_counts",
           "SegmentationMetrics", "TP", "FN", "FP", "CLASS_COLUMNS"]

log = logging.getLogger(__name__)

# Column order of pixel_counts() (and of the first three of class_pixel_counts()).
TP, FN, FP = 0, 1, 2
# Column order of class_pixel_counts(): the union's TP, FN, FP, each nodule class's, then
# benign vs malignant on the found nodule pixels (true class "_as_" predicted class).
CLASS_COLUMNS = ("tp", "fn", "fp", "benign_tp", "benign_fn", "benign_fp", "malignant_tp",
                 "malignant_fn", "malignant_fp", "benign_as_benign", "benign_as_malignant",
                 "malignant_as_benign", "malignant_as_malignant")
_NODULE_CLASSES = ((1, "benign"), (2, "malignant"))


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


def predicted_classes(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, 1, H, W) uint8 classes of 3-class probabilities (N, 3, H, W): nodule where
    p(nodule) = 1 - p(background) > ``threshold`` (the 1-class rule), then the likelier of
    benign and malignant (malignant wins a tie, the class that matters more)."""
    if probs.dim() != 4 or probs.shape[1] != 3:
        raise ValueError(f"probs must be (N, 3, H, W), got {tuple(probs.shape)}")
    nodule = (1 - probs[:, :1]) > threshold
    malignant = probs[:, 2:3] >= probs[:, 1:2]
    return nodule.to(torch.uint8) * (1 + malignant.to(torch.uint8))


def class_pixel_counts(probs: torch.Tensor, label: torch.Tensor, threshold: float = 0.5
                       ) -> torch.Tensor:
    """Per-sample pixel counts of a 3-class prediction, columns :data:`CLASS_COLUMNS`.

    probs : (N, 3, H, W) softmax probabilities, classed by :func:`predicted_classes`;
    label : (N, 1, H, W) integer classes.  Returns (N, 13) int64 on ``probs``' device.
    """
    if label.shape != (probs.shape[0], 1, *probs.shape[2:]):
        raise ValueError(f"label shape {tuple(label.shape)} does not match probs "
                         f"{tuple(probs.shape)}")
    predicted = predicted_classes(probs, threshold).flatten(1).long()
    truth = label.flatten(1).long()
    columns = [(predicted > 0) & (truth > 0), (predicted == 0) & (truth > 0),
               (predicted > 0) & (truth == 0)]
    for value, _ in _NODULE_CLASSES:
        columns += [(predicted == value) & (truth == value),
                    (predicted != value) & (truth == value),
                    (predicted == value) & (truth != value)]
    for true_value, _ in _NODULE_CLASSES:
        for predicted_value, _ in _NODULE_CLASSES:
            columns.append((truth == true_value) & (predicted == predicted_value))
    return torch.stack([c.sum(dim=1) for c in columns], dim=1)


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
    with blob counts, then for ``classes=3`` the ten class columns of
    :func:`class_pixel_counts`).  :meth:`all_reduce` sums them over DDP ranks.
    """

    def __init__(self, device: torch.device | str | None = None, *, classes: int = 1) -> None:
        if classes not in (1, 3):
            raise ValueError(f"classes must be 1 or 3, got {classes!r}")
        self.device = torch.device(device) if device is not None else None
        self.classes = classes
        self.loss_sum: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    @property
    def _width(self) -> int:
        """Pixel-count columns an update brings: 3, or len(CLASS_COLUMNS)."""
        return 3 if self.classes == 1 else len(CLASS_COLUMNS)

    def _allocate(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=dtype, device=device)
        self.counts = torch.zeros(8 + self._width - 3, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget everything accumulated (keeps the device)."""
        if self.counts is not None:
            self.loss_sum.zero_()
            self.counts.zero_()

    def update(self, loss: torch.Tensor, counts: torch.Tensor,
               blobs: torch.Tensor | None = None) -> None:
        """Add a batch: per-sample ``loss`` (N,), ``counts`` (N, 3) from :func:`pixel_counts`
        (``classes=3``: (N, 13) from :func:`class_pixel_counts`) and optionally ``blobs``
        (N, 3) from :func:`blob_counts`."""
        if loss.dim() != 1 or counts.shape != (loss.shape[0], self._width):
            raise ValueError(f"expected loss (N,) and counts (N, {self._width}), got "
                             f"{tuple(loss.shape)} and {tuple(counts.shape)}")
        if blobs is not None and blobs.shape != (loss.shape[0], 3):
            raise ValueError(f"expected blobs (N, 3), got {tuple(blobs.shape)}")
        if self.counts is None:
            self._allocate(self.device if self.device is not None else counts.device)
        self.loss_sum += loss.detach().sum().to(self.loss_sum)
        batch = counts.detach().sum(dim=0).to(self.counts)
        self.counts[:3] += batch[:3]
        self.counts[3] += loss.shape[0]
        if blobs is not None:
            self.counts[4:7] += blobs.sum(dim=0).to(self.counts)
            self.counts[7] += loss.shape[0]
        if self.classes == 3:
            self.counts[8:] += batch[3:]

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
        With ``classes=3`` also the per-class tags and the confusion of the module docstring.
        """
        if self.counts is None:
            values = [0] * (8 + self._width - 3)
            loss_sum = 0.0
        else:
            values = [int(v) for v in self.counts.tolist()]
            loss_sum = float(self.loss_sum.item())
        tp, fn, fp, samples, found, nodules, fp_blobs, blob_samples = values[:8]
        classes = (_class_metrics(dict(zip(CLASS_COLUMNS[3:], values[8:])))
                   if self.classes == 3 else {})
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
        } if blob_samples else {}) | classes


def _class_metrics(counts: dict[str, int]) -> dict[str, float | int]:
    """The per-class and confusion tags of a 3-class model from its summed class columns."""
    out: dict[str, float | int] = {}
    names = [name for _, name in _NODULE_CLASSES]
    for name in names:
        tp, fn, fp = (counts[f"{name}_{kind}"] for kind in ("tp", "fn", "fp"))
        labelled = tp + fn
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, labelled)
        out |= {f"percent_{name}/tp": _ratio(tp, labelled) * 100,
                f"percent_{name}/fn": _ratio(fn, labelled) * 100,
                f"percent_{name}/fp": _ratio(fp, labelled) * 100,
                f"pr_{name}/precision": precision, f"pr_{name}/recall": recall,
                f"pr_{name}/f1_score": _ratio(2 * precision * recall, precision + recall),
                f"count/{name}_tp": tp, f"count/{name}_fn": fn, f"count/{name}_fp": fp}
    # Benign vs malignant on the nodule pixels found: each row is a true class, normalised
    # over what the found pixels of that class were called.
    for true_name in names:
        row = sum(counts[f"{true_name}_as_{name}"] for name in names)
        for name in names:
            cell = counts[f"{true_name}_as_{name}"]
            out[f"confusion/{true_name}_as_{name}"] = _ratio(cell, row)
            out[f"count/{true_name}_as_{name}"] = cell
    right = counts["benign_as_benign"] + counts["malignant_as_malignant"]
    found = right + counts["benign_as_malignant"] + counts["malignant_as_benign"]
    out["confusion/accuracy"] = _ratio(right, found)
    # The mean of the two rows' diagonals: chance is 0.5 however rare malignant pixels are.
    out["confusion/balanced_accuracy"] = 0.5 * (out["confusion/benign_as_benign"]
                                                + out["confusion/malignant_as_malignant"])
    return out
