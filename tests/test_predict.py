"""Running a model over whole volumes: context stacks, padding, views, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import sphere_phantom
from lunaseg.errors import ConfigError
from lunaseg.inputs import SegmentationSpec, clip_hu, context_indices, context_stack
from lunaseg.model import build_model
from lunaseg.predict import predict_volume

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
def test_predict_volume_any_in_plane_size(channel):
    rng = np.random.default_rng(0)
    hu = rng.integers(-2000, 2000, size=(6, 13, 22)).astype(np.int16)  # 13, 22: not x4
    out = predict_volume(ChannelEcho(channel), hu, SPEC, batch_size=4)
    assert out.shape == hu.shape and out.dtype == np.float32
    source = np.clip(np.arange(6) + channel - 3, 0, 5)  # slice each output row came from
    np.testing.assert_array_equal(out, np.clip(hu[source], -1000, 1000).astype(np.float32))


def test_predict_volume_with_a_real_unet():
    model = build_model()
    hu = np.full((5, 30, 41), -700, dtype=np.int16)
    out = predict_volume(model, hu, model.spec, batch_size=2)
    assert out.shape == hu.shape
    assert np.all((out >= 0) & (out <= 1))
    assert model.spec.context_slices == 3


class DiagonalShift(nn.Module):
    """Output pixel (r, c) = centre-slice input at (r - 1, c - 1): anything but mirror-symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 3:4]
        out = torch.zeros_like(centre)
        out[..., 1:, 1:] = centre[..., :-1, :-1]
        return out


@pytest.mark.parametrize("tta", [2, 4])
def test_tta_averages_mirrored_views(tta):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1000, size=(3, 12, 16)).astype(np.float32)
    out = predict_volume(DiagonalShift(), hu, SPEC, tta=tta, crop_to_body=False)
    # Mirroring left-right, shifting, mirroring back shifts the other way: each view reads
    # one diagonal neighbour.  Compare inside the one-pixel frame the shifts leave empty.
    up_left, up_right = hu[:, :-2, :-2], hu[:, :-2, 2:]
    down_left, down_right = hu[:, 2:, :-2], hu[:, 2:, 2:]
    expected = (up_left + up_right) / 2 if tta == 2 else \
        (up_left + up_right + down_left + down_right) / 4
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected, rtol=1e-6, atol=1e-3)


def test_tta_makes_a_real_unet_mirror_equivariant():
    torch.manual_seed(0)
    model = build_model()
    hu = np.random.default_rng(2).integers(-1000, 400, size=(7, 32, 40)).astype(np.int16)
    mirrored = np.ascontiguousarray(hu[:, :, ::-1])
    plain = predict_volume(model, hu, SPEC, crop_to_body=False)
    plain_mirrored = predict_volume(model, mirrored, SPEC, crop_to_body=False)[:, :, ::-1]
    assert np.abs(plain - plain_mirrored).max() > 1e-3  # one view depends on the side
    both = predict_volume(model, hu, SPEC, tta=2, crop_to_body=False)
    both_mirrored = predict_volume(model, mirrored, SPEC, tta=2, crop_to_body=False)[:, :, ::-1]
    np.testing.assert_allclose(both, both_mirrored, atol=1e-5)


def test_tta_must_be_one_two_or_four():
    with pytest.raises(ConfigError, match="tta"):
        predict_volume(DiagonalShift(), np.zeros((2, 8, 8), np.float32), SPEC, tta=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tta", [1, 4])
def test_predict_volume_cuda_bf16_matches_cpu(tta):
    torch.manual_seed(0)
    model = build_model()
    # Input statistics of a lung CT, so the random network's output is not saturated.
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(400.0 ** 2)
    hu, _ = sphere_phantom(shape=(9, 50, 45))
    on_cpu = predict_volume(model, hu, SPEC, device="cpu", tta=tta)
    on_gpu = predict_volume(model, hu, SPEC, device="cuda", amp=True, batch_size=4,
                            tta=tta)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == hu.shape
    np.testing.assert_allclose(on_gpu, on_cpu, atol=0.05)
