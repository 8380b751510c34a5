"""Soft Dice losses: overlap-based, so the huge background does not swamp the nodule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "segmentation_loss"]


def _check_shapes(pred: torch.Tensor, label: torch.Tensor) -> None:
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"pred must be (N, ...) with a batch axis, got {tuple(pred.shape)}")


def dice_loss(pred: torch.Tensor, label: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss ``1 - (2 sum(p l) + eps) / (sum p + sum l + eps)``, shape (N,).

    pred : (N, C, H, W) float probabilities; label : same shape, bool or float.
    Sums run over every axis but the batch.  ``eps`` keeps an empty label with an
    empty prediction at loss 0 instead of 0/0.
    """
    _check_shapes(pred, label)
    label = label.to(pred.dtype)
    dims = tuple(range(1, pred.dim()))
    intersection = (pred * label).sum(dim=dims)
    total = pred.sum(dim=dims) + label.sum(dim=dims)
    return 1 - (2 * intersection + eps) / (total + eps)


def segmentation_loss(
    pred: torch.Tensor, label: torch.Tensor, fn_weight: float = 8.0, *, bce_weight: float = 0.0,
    reduction: str = "mean"
) -> torch.Tensor:
    """``dice(pred, label) + fn_weight * dice(pred * label, label) [+ bce_weight * BCE]``.

    The second term only sees the labelled pixels, so only missed nodule pixels (false
    negatives) raise it: weighting it pushes recall, which matters most for a candidate
    generator.  Soft Dice has a blind spot, though: on a crop with no (or a tiny) label its
    gradient shrinks as 1 / (predicted area)^2, so a model that marks all dense tissue gets
    almost no push back.  The optional pixel-wise binary cross-entropy term (0 in the book's
    recipe) penalises every false-positive pixel at full strength.
    ``reduction="none"`` returns the (N,) per-sample losses instead of their mean.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    label = label.to(pred.dtype)
    per_sample = dice_loss(pred, label) + fn_weight * dice_loss(pred * label, label)
    if bce_weight:
        bce = F.binary_cross_entropy(pred, label, reduction="none")
        per_sample = per_sample + bce_weight * bce.flatten(1).mean(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample
