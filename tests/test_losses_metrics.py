"""Soft Dice losses and pixel metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lunaseg.losses import class_segmentation_loss, dice_loss, segmentation_loss
from lunaseg.metrics import (CLASS_COLUMNS, SegmentationMetrics, blob_counts,
                             class_pixel_counts, pixel_counts, predicted_classes)


def _pair():
    """Sample 0: a partial hit; sample 1: nothing predicted, nothing labelled."""
    pred = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    label = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 0], [0, 0]]]], dtype=torch.bool)
    return pred, label


def test_dice_loss_by_hand():
    pred, label = _pair()
    # Sample 0: sum p = 2, sum l = 2, sum p*l = 1.5 -> 1 - (3 + 1) / (4 + 1) = 0.2.
    # Sample 1: 1 - (0 + 1) / (0 + 1) = 0.
    torch.testing.assert_close(dice_loss(pred, label), torch.tensor([0.2, 0.0]))


def test_dice_loss_perfect_and_disjoint():
    label = torch.zeros(1, 1, 4, 4)
    label[..., :2, :2] = 1
    assert dice_loss(label.clone(), label).item() == pytest.approx(0.0)
    # Disjoint: 12 predicted, 4 labelled, no overlap -> 1 - 1 / (12 + 4 + 1).
    assert dice_loss(1 - label, label).item() == pytest.approx(1 - 1 / 17)


def test_segmentation_loss_by_hand():
    pred, label = _pair()
    # Sample 0, FN term: p*l sums to 1.5 and overlaps l by 1.5 -> 1 - 4 / 4.5 = 1/9.
    first = 0.2 + 8 * (1 / 9)
    per_sample = segmentation_loss(pred, label, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([first, 0.0]))
    assert segmentation_loss(pred, label).item() == pytest.approx(first / 2)
    assert segmentation_loss(pred, label, fn_weight=0.0).item() == pytest.approx(0.1)


def test_false_positives_do_not_touch_the_fn_term():
    label = torch.zeros(1, 1, 4, 4)
    label[..., 0, 0] = 1
    hit = label.clone()
    hit_plus_fp = torch.ones(1, 1, 4, 4)  # same hit, 15 extra false positives
    fn_term = lambda p: dice_loss(p * label, label).item()  # noqa: E731
    assert fn_term(hit) == pytest.approx(fn_term(hit_plus_fp))


def test_cross_entropy_term_by_hand():
    pred = torch.tensor([[[[0.5, 0.25]]]])
    label = torch.tensor([[[[1.0, 0.0]]]])
    dice_only = segmentation_loss(pred, label, fn_weight=2.0)
    both = segmentation_loss(pred, label, fn_weight=2.0, bce_weight=3.0)
    bce = -(math.log(0.5) + math.log(0.75)) / 2
    assert both.item() == pytest.approx(dice_only.item() + 3.0 * bce, rel=1e-6)


def test_cross_entropy_pushes_back_on_false_positives_where_dice_is_flat():
    label = torch.zeros(1, 1, 32, 32)  # a negative crop
    everything = torch.full((1, 1, 32, 32), 0.99, requires_grad=True)
    segmentation_loss(everything, label).backward()
    dice_grad = everything.grad.abs().max().item()
    everything.grad = None
    segmentation_loss(everything, label, bce_weight=1.0).backward()
    assert dice_grad < 1e-5 < everything.grad.abs().max().item()


def test_loss_has_gradient():
    pred = torch.full((2, 1, 4, 4), 0.3, requires_grad=True)
    label = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    label[:, :, 1:3, 1:3] = True
    segmentation_loss(pred, label).backward()
    # Raising p on labelled pixels must lower the loss.
    assert torch.all(pred.grad[label] < 0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 3))


def test_pixel_counts_by_hand():
    pred, label = _pair()
    # Sample 0 at > 0.5: only the 1.0 pixel is predicted -> TP 1, FN 1, FP 0.
    counts = pixel_counts(pred, label)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[1, 1, 0], [0, 0, 0]]
    assert pixel_counts(pred, label, threshold=0.4).tolist() == [[2, 0, 1], [0, 0, 0]]
    assert pixel_counts(pred, label.float()).tolist() == counts.tolist()


def test_metrics_by_hand():
    metrics = SegmentationMetrics()
    metrics.update(torch.tensor([1.0, 3.0]), torch.tensor([[3, 1, 10], [1, 0, 2]]))
    metrics.update(torch.tensor([2.0]), torch.tensor([[0, 5, 0]]))
    m = metrics.compute()
    # TP 4, FN 6, FP 12 over 10 labelled pixels; 3 samples, loss sum 6.
    assert m["loss/all"] == pytest.approx(2.0)
    assert m["percent_all/tp"] == pytest.approx(40.0)
    assert m["percent_all/fn"] == pytest.approx(60.0)
    assert m["percent_all/fp"] == pytest.approx(120.0)  # can exceed 100
    precision, recall = 4 / 16, 4 / 10
    assert m["pr/precision"] == pytest.approx(precision)
    assert m["pr/recall"] == pytest.approx(recall)
    assert m["pr/f1_score"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert (m["count/tp"], m["count/fn"], m["count/fp"], m["samples"]) == (4, 6, 12, 3)


def test_blob_counts_by_hand():
    label = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    pred = torch.zeros(2, 1, 8, 8)
    label[0, 0, 1:3, 1:3] = True  # nodule A, found by one touching pixel
    label[0, 0, 5:7, 5:7] = True  # nodule B, missed
    pred[0, 0, 2, 2] = 0.9
    pred[0, 0, 0:2, 5] = 0.8  # a false-positive blob
    pred[0, 0, 7, 0] = 0.7  # another, diagonal to nothing
    pred[0, 0, 4, 4] = 0.4  # below threshold: nothing
    pred[1, 0, 3, 3] = pred[1, 0, 4, 4] = 0.9  # one blob (8-connected), no nodule
    counts = blob_counts(pred, label)
    assert counts.tolist() == [[1, 2, 2], [0, 0, 1]]
    metrics = SegmentationMetrics()
    metrics.update(torch.zeros(2), pixel_counts(pred, label), counts)
    m = metrics.compute()
    assert m["blobs/recall"] == 0.5 and m["blobs/fp_per_slice"] == 1.5
    assert "blobs/recall" not in SegmentationMetrics().compute()  # none recorded, no tags


def test_metrics_zero_divisions():
    empty = SegmentationMetrics().compute()
    assert math.isnan(empty["loss/all"]) and empty["samples"] == 0
    assert empty["pr/precision"] == empty["pr/recall"] == empty["pr/f1_score"] == 0.0

    metrics = SegmentationMetrics()
    metrics.update(torch.zeros(1), torch.tensor([[0, 0, 7]]))  # only false positives
    m = metrics.compute()
    assert m["percent_all/fp"] == 0.0 and m["pr/precision"] == 0.0 and m["pr/f1_score"] == 0.0


def test_reset_and_reduce_hook():
    metrics = SegmentationMetrics()
    metrics.update(torch.tensor([1.0]), torch.tensor([[1, 1, 1]]))
    metrics.reduce_(lambda t: t.mul_(2))  # what an all-reduce over two equal ranks does
    m = metrics.compute()
    assert (m["count/tp"], m["samples"], m["loss/all"]) == (2, 2, 1.0)
    metrics.reset()
    assert metrics.compute()["samples"] == 0
    metrics.all_reduce()  # torch.distributed not initialised: nothing happens
    assert metrics.compute()["samples"] == 0


def test_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        metrics = SegmentationMetrics()
        metrics.update(torch.tensor([0.5, 1.5]), torch.tensor([[2, 2, 0], [0, 0, 4]]))
        metrics.all_reduce()
        m = metrics.compute()
        assert (m["count/tp"], m["count/fp"], m["samples"], m["loss/all"]) == (2, 4, 2, 1.0)
    finally:
        dist.destroy_process_group()


def test_update_checks_shapes():
    with pytest.raises(ValueError, match="counts"):
        SegmentationMetrics().update(torch.zeros(2), torch.zeros(3, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------- 3 classes


def _class_pair():
    """One sample, 2x4 pixels: labels 0 0 1 1 / 2 2 2 0; the prediction (as classes)
    1 0 1 2 / 2 0 1 2: every kind of hit and miss once or more."""
    label = torch.tensor([[[[0, 0, 1, 1], [2, 2, 2, 0]]]], dtype=torch.uint8)
    # Probabilities (background, benign, malignant) per pixel that class as written above.
    table = {0: (0.8, 0.15, 0.05), 1: (0.1, 0.6, 0.3), 2: (0.2, 0.3, 0.5)}
    predicted = [[1, 0, 1, 2], [2, 0, 1, 2]]
    probs = torch.tensor([[[table[v][c] for v in row] for row in predicted]
                          for c in range(3)])[None]
    return probs, label


def test_class_pixel_counts_by_hand():
    probs, label = _class_pair()
    counts = dict(zip(CLASS_COLUMNS, class_pixel_counts(probs, label)[0].tolist()))
    # The union, as the book counts it: nodule pixels (2, 3, 4, 5, 6) found at 2, 3, 4, 6.
    assert (counts["tp"], counts["fn"], counts["fp"]) == (4, 1, 2)
    # Benign (2, 3): 2 right, 3 called malignant; called benign but not: 0 (bg), 6 (mal).
    assert (counts["benign_tp"], counts["benign_fn"], counts["benign_fp"]) == (1, 1, 2)
    # Malignant (4, 5, 6): 4 right, 5 missed, 6 called benign; 3 (benign), 7 (bg) called it.
    assert (counts["malignant_tp"], counts["malignant_fn"], counts["malignant_fp"]) == (1, 2, 2)
    # Found nodule pixels: benign 2 -> benign, 3 -> malignant; malignant 4 -> malignant,
    # 6 -> benign.
    assert (counts["benign_as_benign"], counts["benign_as_malignant"],
            counts["malignant_as_benign"], counts["malignant_as_malignant"]) == (1, 1, 1, 1)
    assert predicted_classes(probs)[0, 0].tolist() == [[1, 0, 1, 2], [2, 0, 1, 2]]


def test_class_metrics_tags_by_hand():
    probs, label = _class_pair()
    metrics = SegmentationMetrics(classes=3)
    metrics.update(torch.tensor([1.0]), class_pixel_counts(probs, label))
    tags = metrics.compute()
    # The book's tags keep their meaning: the union of the nodule classes.
    assert tags["pr/recall"] == pytest.approx(4 / 5)
    assert tags["pr/precision"] == pytest.approx(4 / 6)
    assert tags["pr_benign/recall"] == pytest.approx(1 / 2)
    assert tags["pr_benign/precision"] == pytest.approx(1 / 3)
    assert tags["pr_benign/f1_score"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert tags["pr_malignant/recall"] == pytest.approx(1 / 3)
    assert tags["percent_malignant/fn"] == pytest.approx(200 / 3)
    assert tags["percent_malignant/fp"] == pytest.approx(200 / 3)
    assert tags["percent_benign/tp"] == pytest.approx(50.0)
    assert tags["confusion/benign_as_malignant"] == pytest.approx(0.5)
    assert tags["confusion/malignant_as_malignant"] == pytest.approx(0.5)
    assert tags["confusion/accuracy"] == pytest.approx(0.5)
    assert tags["confusion/balanced_accuracy"] == pytest.approx(0.5)
    # A 1-class metrics object has none of them, and refuses class counts.
    assert "pr_benign/recall" not in SegmentationMetrics().compute()
    with pytest.raises(ValueError, match=r"counts \(N, 3\)"):
        SegmentationMetrics().update(torch.tensor([1.0]), class_pixel_counts(probs, label))


def test_class_metrics_sum_over_batches_and_ranks():
    probs, label = _class_pair()
    one = SegmentationMetrics(classes=3)
    for _ in range(2):
        one.update(torch.tensor([1.0]), class_pixel_counts(probs, label))
    both = SegmentationMetrics(classes=3)
    both.update(torch.tensor([1.0, 1.0]), class_pixel_counts(probs.repeat(2, 1, 1, 1),
                                                             label.repeat(2, 1, 1, 1)))
    assert one.compute() == both.compute()
    empty = SegmentationMetrics(classes=3)
    empty.reduce_(lambda t: t.add_(both.counts if t.dtype == torch.int64 else both.loss_sum))
    assert empty.compute() == both.compute()


def test_class_loss_keeps_the_chapters_nodule_loss():
    logits = torch.randn(3, 3, 8, 8) * 2
    label = torch.randint(0, 3, (3, 1, 8, 8), dtype=torch.uint8)
    label[2] = 0  # a sample without any nodule pixel
    p_nodule = 1 - torch.softmax(logits, dim=1)[:, :1]
    union = label > 0
    # Without the class term it is the 1-class loss on p(nodule) and the union.
    torch.testing.assert_close(
        class_segmentation_loss(logits, label, 8.0, class_weight=0.0, reduction="none"),
        segmentation_loss(p_nodule, union, 8.0, reduction="none"))
    torch.testing.assert_close(
        class_segmentation_loss(logits, label, 1.0, bce_weight=2.0, class_weight=0.0,
                                reduction="none"),
        segmentation_loss(p_nodule, union, 1.0, bce_weight=2.0, reduction="none"),
        rtol=1e-5, atol=1e-5)
    # The class term: -log p(true class | nodule), averaged over each sample's nodule pixels.
    with_class = class_segmentation_loss(logits, label, 8.0, class_weight=1.0,
                                         reduction="none")
    without = class_segmentation_loss(logits, label, 8.0, class_weight=0.0, reduction="none")
    conditional = torch.log_softmax(logits[:, 1:], dim=1)
    for n in range(2):
        nodule = union[n, 0]
        truth = label[n, 0][nodule].long() - 1
        expected = -conditional[n][:, nodule].gather(0, truth[None])[0].mean()
        torch.testing.assert_close(with_class[n] - without[n], expected)
    assert with_class[2] == without[2]  # no nodule pixel, no class term


def test_the_class_term_never_pushes_nodule_against_background():
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 6, 6), dtype=torch.uint8)
    with_class = class_segmentation_loss(logits, label, class_weight=1.0).sum()
    without = class_segmentation_loss(logits, label, class_weight=0.0).sum()
    (gradient,) = torch.autograd.grad(with_class - without, logits)
    # Only benign vs malignant moves: the background score and the sum of the two nodule
    # scores (what p(nodule) depends on, to first order) get no push from it.
    assert gradient[:, 0].abs().max() == 0
    torch.testing.assert_close(gradient[:, 1] + gradient[:, 2], torch.zeros(2, 6, 6))
    # A right class costs less than a wrong one; the nodule terms are the same for both.
    right = torch.zeros(1, 3, 1, 2)
    right[0, 1, 0, 0] = right[0, 2, 0, 1] = 4.0
    wrong = right[:, [0, 2, 1]]  # benign and malignant swapped
    two = torch.tensor([[[[1, 2]]]], dtype=torch.uint8)
    assert class_segmentation_loss(right, two) < class_segmentation_loss(wrong, two)
    assert class_segmentation_loss(right, two, class_weight=0.0) == pytest.approx(
        class_segmentation_loss(wrong, two, class_weight=0.0).item())
