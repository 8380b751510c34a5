"""Running a model over whole volumes: context stacks, padding, crops, views, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ClassStandIn, sphere_phantom
from lunaseg.errors import ConfigError
from lunaseg.inputs import SegmentationSpec, clip_hu, context_indices, context_stack
from lunaseg.model import build_model
from lunaseg.predict import (OUTSIDE_LOGIT, network_box, predict_classes, predict_logits,
                             sigmoid)

SPEC = SegmentationSpec()


class ChannelEcho(nn.Module):
    """Returns one input channel unchanged; refuses sizes a depth-3 U-Net cannot take."""

    def __init__(self, channel: int, in_channels: int = 7) -> None:
        super().__init__()
        self.channel = channel
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.in_channels
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, tuple(x.shape)
        return x[:, self.channel:self.channel + 1]


# --------------------------------------------------------------------------- stacks


def test_context_indices_repeat_edge_slices():
    index = context_indices(5, [0, 2, 4], 3)
    assert index.tolist() == [[0, 0, 0, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 4],
                              [1, 2, 3, 4, 4, 4, 4]]


def test_context_stack_clips_and_orders_channels():
    hu = np.arange(4, dtype=np.int16).reshape(4, 1, 1) * 900 - 1500  # -1500, -600, 300, 1200
    stack = clip_hu(context_stack(hu, [0, 3], context_slices=1), SPEC)
    assert stack.dtype == np.float32 and stack.shape == (2, 3, 1, 1)
    assert stack[:, :, 0, 0].tolist() == [[-1000, -1000, -600], [300, 1000, 1000]]


@pytest.mark.parametrize("channel", [0, 3, 6])
def test_predict_logits_any_in_plane_size(channel):
    rng = np.random.default_rng(0)
    hu = rng.integers(-2000, 2000, size=(6, 13, 22)).astype(np.int16)  # 13, 22: not x4
    out = predict_logits(ChannelEcho(channel), hu, SPEC, batch_size=4)
    assert out.shape == hu.shape and out.dtype == np.float32
    source = np.clip(np.arange(6) + channel - 3, 0, 5)  # slice each output row came from
    np.testing.assert_array_equal(out, np.clip(hu[source], -1000, 1000).astype(np.float32))


def test_predict_logits_with_a_real_unet():
    model = build_model()
    hu = np.full((5, 30, 41), -700, dtype=np.int16)
    out = predict_logits(model, hu, model.spec, batch_size=2)
    assert out.shape == hu.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert model.spec.context_slices == 3


def test_context_comes_from_the_whole_volume_not_the_region():
    hu = (np.arange(8, dtype=np.int16) * 100).reshape(8, 1, 1).repeat(8, 1).repeat(8, 2)
    region = (slice(2, 5), slice(0, 8), slice(0, 8))
    out = predict_logits(ChannelEcho(0), hu, SPEC, region=region)  # channel 0: slice i - 3
    assert out[2:5, 0, 0].tolist() == [0.0, 0.0, 100.0]  # slices -1, 0, 1 (edge repeats)
    assert (out[:2] == OUTSIDE_LOGIT).all() and (out[5:] == OUTSIDE_LOGIT).all()


def test_a_crop_gives_exactly_the_whole_slice_output():
    # The box is grown by the model's reach and started on its pooling grid, so inside the
    # box the network computes what it computes on the whole slice.
    torch.manual_seed(3)
    model = build_model()
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(300.0 ** 2)
    hu = np.random.default_rng(4).integers(-1000, 400, size=(9, 96, 104)).astype(np.int16)
    whole = predict_logits(model, hu, model.spec, crop_to_body=False)
    for rows, cols in ((slice(33, 61), slice(27, 80)), (slice(1, 30), slice(70, 103))):
        crop = predict_logits(model, hu, model.spec, region=(slice(None), rows, cols))
        np.testing.assert_allclose(crop[:, rows, cols], whole[:, rows, cols], rtol=0, atol=1e-4)
        assert (np.delete(crop, np.r_[rows], axis=1) == OUTSIDE_LOGIT).all()
    assert network_box((33, 61, 27, 80), (96, 104), model.spec) == (8, 85, 0, 104)


class DiagonalShift(nn.Module):
    """Output pixel (r, c) = centre-slice input at (r - 1, c - 1): anything but mirror-symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 3:4]
        out = torch.zeros_like(centre)
        out[..., 1:, 1:] = centre[..., :-1, :-1]
        return out


@pytest.mark.parametrize("tta", [2, 4])
@pytest.mark.parametrize("rule", ["mean", "consensus"])
def test_tta_combines_mirrored_views(tta, rule):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1000, size=(3, 12, 16)).astype(np.float32)
    out = predict_logits(DiagonalShift(), hu, SPEC, tta=tta, tta_rule=rule, crop_to_body=False)
    # Mirroring left-right, shifting, mirroring back shifts the other way: each view reads
    # one diagonal neighbour.  Compare inside the one-pixel frame the shifts leave empty.
    neighbours = [hu[:, :-2, :-2], hu[:, :-2, 2:], hu[:, 2:, :-2], hu[:, 2:, 2:]]
    views = np.stack(neighbours[:2] if tta == 2 else neighbours)
    expected = views.mean(axis=0) if rule == "mean" else views.min(axis=0)
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected, rtol=1e-6, atol=1e-3)


def test_tta_makes_a_real_unet_mirror_equivariant():
    torch.manual_seed(0)
    model = build_model()
    hu = np.random.default_rng(2).integers(-1000, 400, size=(7, 32, 40)).astype(np.int16)
    mirrored = np.ascontiguousarray(hu[:, :, ::-1])
    plain = predict_logits(model, hu, SPEC, crop_to_body=False)
    plain_mirrored = predict_logits(model, mirrored, SPEC, crop_to_body=False)[:, :, ::-1]
    assert np.abs(plain - plain_mirrored).max() > 1e-3  # one view depends on the side
    both = predict_logits(model, hu, SPEC, tta=2, crop_to_body=False)
    both_mirrored = predict_logits(model, mirrored, SPEC, tta=2, crop_to_body=False)[:, :, ::-1]
    np.testing.assert_allclose(both, both_mirrored, atol=1e-5)


def test_tta_must_be_one_two_or_four():
    with pytest.raises(ConfigError, match="tta"):
        predict_logits(DiagonalShift(), np.zeros((2, 8, 8), np.float32), SPEC, tta=3)
    with pytest.raises(ConfigError, match="tta_rule"):
        predict_logits(DiagonalShift(), np.zeros((2, 8, 8), np.float32), SPEC, tta=2,
                       tta_rule="max")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tta", [1, 4])
def test_predict_logits_cuda_bf16_matches_cpu(tta):
    torch.manual_seed(0)
    model = build_model()
    # Input statistics of a lung CT, so the random network's output is not saturated.
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(400.0 ** 2)
    hu, _ = sphere_phantom(shape=(9, 50, 45))
    on_cpu = predict_logits(model, hu, SPEC, device="cpu", tta=tta)
    on_gpu = predict_logits(model, hu, SPEC, device="cuda", amp=True, batch_size=4,
                            tta=tta)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == hu.shape
    np.testing.assert_allclose(sigmoid(on_gpu), sigmoid(on_cpu), atol=0.05)


# --------------------------------------------------------------------------- 3 classes


@pytest.mark.parametrize("tta, rule", [(1, "mean"), (4, "consensus"), (4, "mean")])
def test_a_3_class_model_gives_nodule_and_malignancy_logits(tta, rule):
    rng = np.random.default_rng(1)
    hu = rng.integers(-900, 700, size=(5, 20, 24)).astype(np.int16)
    nodule, malignancy = predict_classes(ClassStandIn(), hu, ClassStandIn.spec, tta=tta,
                                         tta_rule=rule, crop_to_body=False)
    x = np.clip(hu, -1000, 1000).astype(np.float64)
    benign = (x + 500) / 50
    malignant = benign + (x - 200) / 50
    # logit p(nodule) = log(e^benign + e^malignant) - background (0); the stand-in is the
    # same on every mirrored view, so views do not change it.
    np.testing.assert_allclose(nodule, np.logaddexp(benign, malignant), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(malignancy, (x - 200) / 50, rtol=1e-5, atol=1e-4)
    # Their sigmoids multiply to the softmax's p(malignant).
    stacks = torch.from_numpy(np.repeat(x[:, None], 7, axis=1).astype(np.float32))
    softmax = ClassStandIn()(stacks)
    np.testing.assert_allclose(sigmoid(nodule) * sigmoid(malignancy), softmax[:, 2].numpy(),
                               rtol=1e-4, atol=1e-6)
    # predict_logits gives the nodule channel alone; a 1-class model has no malignancy.
    np.testing.assert_array_equal(predict_logits(ClassStandIn(), hu, ClassStandIn.spec,
                                                 tta=tta, tta_rule=rule, crop_to_body=False),
                                  nodule)
    assert predict_classes(ChannelEcho(3), hu, SPEC, crop_to_body=False)[1] is None


def test_malignancy_views_are_averaged():
    class Skewed(ClassStandIn):
        """Malignancy rises to the right: a left-right mirrored view sees it fall."""

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            out = super().logits(x)
            ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(out[:, 2])
            out[:, 2] = out[:, 1] + ramp
            return out

    hu = np.full((3, 8, 12), 100, dtype=np.int16)
    _, one = predict_classes(Skewed(), hu, SPEC, tta=1, crop_to_body=False)
    _, two = predict_classes(Skewed(), hu, SPEC, tta=2, crop_to_body=False)
    np.testing.assert_allclose(one[0, 0], np.arange(12))
    # The mirrored view's ramp, flipped back, runs 11..0: the mean is flat at 5.5.
    np.testing.assert_allclose(two, 5.5)


# --------------------------------------------------------------------------- training pixels


class ScaleSensitive(nn.Module):
    """Logit +10 on pixels of a bright disc no wider than 4 pixels, -10 elsewhere: a network
    that has learnt one scale (a disc twice as wide in pixels is no longer its object)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 3:4] > 0).float()
        width = torch.nn.functional.avg_pool2d(bright, 9, stride=1, padding=4) * 81
        return torch.where((bright > 0) & (width <= 16), 10.0, -10.0)


def test_resample_only_beyond_the_tolerance():
    from lunaseg.inputs import RESAMPLE_TOLERANCE, resample_pixel_mm

    spec = SegmentationSpec(pixel_mm=1.4)
    assert resample_pixel_mm(spec, (1.4 * (1 + RESAMPLE_TOLERANCE * 0.9),) * 2) is None
    assert resample_pixel_mm(spec, (0.7, 0.7)) == 1.4
    assert resample_pixel_mm(spec, (1.4, 2.0)) == 1.4  # either axis
    assert resample_pixel_mm(SegmentationSpec(), (0.7, 0.7)) is None  # the book's: never
    assert resample_pixel_mm(spec, None) is None
    with pytest.raises(ConfigError, match="pixel_mm"):
        SegmentationSpec(pixel_mm=0.0).check()


def test_resize_slices_keeps_positions_and_shapes():
    from lunaseg.inputs import resize_slices

    volume = np.zeros((2, 3, 60, 80), np.float32)
    volume[..., 30:34, 50:54] = 1.0  # a square centred at (31.5, 51.5)
    small = resize_slices(volume, (30, 40))
    assert small.shape == (2, 3, 30, 40) and small.dtype == np.float32
    rows, cols = np.nonzero(small[0, 0] > 0.25)
    # Pixel edges line up: centre c on the fine grid is (c + 0.5) / 2 - 0.5 on the coarse.
    assert abs(rows.mean() - 15.5) < 0.6 and abs(cols.mean() - 25.5) < 0.6
    back = resize_slices(small, (60, 80))
    assert back.shape == volume.shape
    assert np.unravel_index(np.argmax(back[1, 2]), (60, 80))[0] in range(29, 35)
    np.testing.assert_array_equal(resize_slices(volume, (60, 80)), volume)


def test_a_scan_at_finer_pixels_reaches_the_network_at_its_training_pixels():
    """A 6 mm disc is 4 px at the model's 1.5 mm but 8.6 px at 0.7 mm: resampled, the
    network sees its object; fed natively, it does not. The output stays on the scan's grid."""
    yy, xx = np.mgrid[:96, :96]
    disc = ((yy - 40.0) ** 2 + (xx - 60.0) ** 2 < (3.0 / 0.7) ** 2)
    hu = np.where(disc[None], 50, -900).repeat(7, axis=0).astype(np.int16)
    spec = SegmentationSpec(pixel_mm=1.5)
    native = predict_logits(ScaleSensitive(), hu, spec)
    fed = predict_logits(ScaleSensitive(), hu, spec, spacing_rc=(0.7, 0.7))
    assert native.shape == fed.shape == hu.shape
    assert (native[3][disc] < 0).all()  # too wide at the scan's own pixels
    inside = fed[3] > 0
    assert inside[40, 60] and inside[disc].mean() > 0.3 and inside[~disc].mean() < 0.01
    region = (slice(0, 7), slice(20, 70), slice(30, 90))  # a region scales with the pixels
    cropped = predict_logits(ScaleSensitive(), hu, spec, region=region, spacing_rc=(0.7, 0.7))
    assert cropped[3, 40, 60] > 0 and cropped[3, 5, 5] == OUTSIDE_LOGIT
