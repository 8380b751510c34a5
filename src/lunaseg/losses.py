"""Soft Dice losses (SPEC §9): overlap-based, so the huge background does not swamp the nodule."""

from __future__ import annotations

import torch

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
    pred: torch.Tensor, label: torch.Tensor, fn_weight: float = 8.0, *, reduction: str = "mean"
) -> torch.Tensor:
    """``dice(pred, label) + fn_weight * dice(pred * label, label)``, averaged over the batch.

    The second term only sees the labelled pixels, so only missed nodule pixels (false
    negatives) raise it: weighting it pushes recall, which matters most for a candidate
    generator.  ``reduction="none"`` returns the (N,) per-sample losses instead.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    label = label.to(pred.dtype)
    per_sample = dice_loss(pred, label) + fn_weight * dice_loss(pred * label, label)
    return per_sample.mean() if reduction == "mean" else per_sample
