"""Soft Dice losses: overlap-based, so the huge background does not swamp the nodule; and
the 3-class loss built on them (chapter exercise 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "segmentation_loss", "class_segmentation_loss", "nodule_logit",
           "malignancy_logit"]


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


def nodule_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, ...) logit of p(nodule) = 1 - p(background) from 3-class logits (N, 3, ...):
    ``logsumexp(benign, malignant) - background``, exact where the softmax saturates."""
    return torch.logsumexp(logits[:, 1:3], dim=1, keepdim=True) - logits[:, :1]


def malignancy_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, ...) logit of p(malignant | nodule) from 3-class logits: malignant - benign."""
    return logits[:, 2:3] - logits[:, 1:2]


def class_segmentation_loss(
    logits: torch.Tensor, label: torch.Tensor, fn_weight: float = 8.0, *,
    bce_weight: float = 0.0, class_weight: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """The 3-class loss: the chapter's nodule loss on p(nodule), plus a class term.

    logits : (N, 3, H, W) scores of background, benign, malignant; label : (N, 1, H, W)
    integer classes (0, 1, 2).  The nodule-vs-background decision gets exactly
    :func:`segmentation_loss` on p(nodule) = 1 - p(background) against the union of the two
    nodule classes (Dice + ``fn_weight`` x false-negative Dice [+ ``bce_weight`` x BCE]), so
    the recall bias of the candidate stage does not depend on what kind of nodule it is.
    The class term is the cross-entropy of benign vs malignant, ``-log p(true class |
    nodule)``, averaged over each sample's labelled nodule pixels (0 for a sample without
    any) and weighted by ``class_weight``: it only decides which nodule class, never whether
    a pixel is nodule, so it cannot trade recall for class accuracy.  Per-sample averaging
    gives a small nodule as much say as a large one.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if logits.dim() != 4 or logits.shape[1] != 3:
        raise ValueError(f"logits must be (N, 3, H, W), got {tuple(logits.shape)}")
    if label.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"label shape {tuple(label.shape)} does not match logits "
                         f"{tuple(logits.shape)}")
    classes = label.long()
    nodule = (classes > 0).to(logits.dtype)
    z = nodule_logit(logits)
    # The nodule part as segmentation_loss computes it, with BCE taken from the logit (the
    # probability of a saturated softmax rounds to 1).
    p_nodule = torch.sigmoid(z)
    per_sample = dice_loss(p_nodule, nodule) + fn_weight * dice_loss(p_nodule * nodule, nodule)
    if bce_weight:
        bce = F.binary_cross_entropy_with_logits(z, nodule, reduction="none")
        per_sample = per_sample + bce_weight * bce.flatten(1).mean(dim=1)
    if class_weight:
        m = malignancy_logit(logits)
        malignant = (classes == 2).to(logits.dtype)
        pixel_ce = F.binary_cross_entropy_with_logits(m, malignant, reduction="none")
        pixels = nodule.flatten(1).sum(dim=1)
        class_ce = (pixel_ce * nodule).flatten(1).sum(dim=1) / pixels.clamp(min=1)
        per_sample = per_sample + class_weight * class_ce
    return per_sample.mean() if reduction == "mean" else per_sample
