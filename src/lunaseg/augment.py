"""Random affine + noise augmentation on the training device, one transform per sample:
(input, label) slice stacks for the U-Net (2D) and candidate crops for the classifier (3D).

Unlike the book, every sample gets its own transform, and the offset is written to the
translation column of the matrix, where ``F.affine_grid`` actually reads it.  Drawing the
parameters (``draw_transforms``) is kept apart from applying them (:func:`apply_affine`,
:func:`apply_crop_affine`), so a draw can be logged and replayed.  Both modules take their
randomness from their own per-device generators, never from torch's global RNG.

A U-Net's label is a mask (bool or float: nodule or not) or, for a 3-class model, integer
classes (0 background, 1 benign, 2 malignant), which stay integer classes.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lunaseg.config import AugmentConfig, CropAugmentConfig
from lunaseg.errors import ConfigError

__all__ = ["SegmentationAugmentation", "apply_affine", "identity_transforms",
           "CropAugmentation", "apply_crop_affine", "identity_transforms_3d",
           "source_crop_irc"]

log = logging.getLogger(__name__)


def _check_options(config: AugmentConfig | CropAugmentConfig, prefix: str) -> None:
    if not (config.offset >= 0.0 and math.isfinite(config.offset)):
        raise ConfigError(f"{prefix}.offset must be >= 0, got {config.offset!r}")
    if not 0.0 <= config.scale < 1.0:
        # A factor 1 - scale <= 0 would collapse or mirror the image.
        raise ConfigError(f"{prefix}.scale must be in [0, 1), got {config.scale!r}")
    if not (config.noise_hu >= 0.0 and math.isfinite(config.noise_hu)):
        raise ConfigError(f"{prefix}.noise_hu must be >= 0, got {config.noise_hu!r}")


class _DeviceRandom(nn.Module):
    """What both augmentations share: their options' checks, one generator per device (all
    derived from ``seed``, or ``generator`` for the device it lives on), and the noise."""

    def __init__(self, config: AugmentConfig | CropAugmentConfig, prefix: str,
                 seed: int | None, generator: torch.Generator | None) -> None:
        super().__init__()
        _check_options(config, prefix)
        self.config = config
        if seed is None:
            # Drawn from the global RNG once, so torch.manual_seed still makes runs repeatable.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        if generator is not None:
            self._generators[self._device_key(generator.device)] = generator

    def _draw_flip_scale(self, n: int, dims: int, device: torch.device | str,
                         generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, dims, dims) flip-and-scale matrices, and the uniforms the caller's rotation
        (N,) and offset (N, dims, in [-1, 1]) use.  Every uniform is drawn in one order
        whichever options are on, so switching one does not change the others' draws."""
        g = generator if generator is not None else self.generator(device)
        flip_u = torch.rand(n, dims, device=device, generator=g)
        scale_u = torch.rand(n, dims, device=device, generator=g) * 2 - 1
        angle_u = torch.rand(n, device=device, generator=g)
        offset_u = torch.rand(n, dims, device=device, generator=g) * 2 - 1
        diagonal = torch.ones(n, dims, device=device)
        if self.config.flip:
            diagonal = torch.where(flip_u < 0.5, -diagonal, diagonal)
        if self.config.scale > 0:
            diagonal = diagonal * (1 + self.config.scale * scale_u)
        return torch.diag_embed(diagonal), angle_u, offset_u

    @property
    def spatial(self) -> bool:
        """Whether any geometric option is on."""
        c = self.config
        return bool(c.flip or c.offset > 0 or c.scale > 0 or c.rotate)

    @property
    def enabled(self) -> bool:
        """Whether the forward pass changes anything at all."""
        return self.spatial or self.config.noise_hu > 0

    @staticmethod
    def _device_key(device: torch.device | str) -> str:
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            # "cuda" and "cuda:0" must share one generator.
            index = torch.cuda.current_device() if device.type == "cuda" else 0
            device = torch.device(device.type, index)
        return str(device)

    def reseed(self, seed: int) -> None:
        """Start every device's random stream afresh from ``seed`` (the trainers do this
        each epoch, so a resumed run draws exactly what an uninterrupted one would)."""
        self.seed = int(seed)
        self._generators.clear()

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The module's generator for ``device``, created on first use."""
        key = self._device_key(device)
        if key not in self._generators:
            # Different devices (DDP ranks) get different streams from one seed.
            derived = (self.seed ^ zlib.crc32(key.encode())) % 2**63
            self._generators[key] = torch.Generator(device=key).manual_seed(derived)
        return self._generators[key]

    def add_noise(self, input: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """``input`` plus Gaussian noise of sigma ``noise_hu`` (a no-op when it is 0)."""
        if self.config.noise_hu <= 0:
            return input
        g = generator if generator is not None else self.generator(input.device)
        noise = torch.randn(input.shape, device=input.device, dtype=input.dtype, generator=g)
        # One fused pass, into the noise's own memory (drawing it is already the main cost);
        # out= cannot join autograd, so an input that needs gradients gets a new tensor.
        return torch.add(input, noise, alpha=self.config.noise_hu,
                         out=None if input.requires_grad else noise)

    def extra_repr(self) -> str:
        c = self.config
        return (f"flip={c.flip}, offset={c.offset}, scale={c.scale}, rotate={c.rotate}, "
                f"noise_hu={c.noise_hu}, seed={self.seed}")


# ----------------------------------------------------------------------------- 2D


def identity_transforms(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` identity matrices, (N, 2, 3) float32."""
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    return theta


def apply_affine(
    input: torch.Tensor, label: torch.Tensor | None, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``input`` (N, C, H, W) and ``label`` (N, 1, H, W) with per-sample ``theta``.

    ``theta`` (N, 2, 3) maps output to input positions in normalised coordinates
    (``F.affine_grid`` convention, ``align_corners=False``).  Outside the image the edge
    value is repeated.  The label is resampled as float with the same grid and returned
    as bool (> 0.5), so it stays aligned with the input and binary.  Integer class labels
    are resampled as one channel per nodule class: a pixel is nodule where their sum
    passes 0.5 (so the nodule mask moves exactly as a bool label would) and takes the
    class with the larger share (malignant on a tie); they return as uint8 classes.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if theta.shape != (input.shape[0], 2, 3):
        raise ValueError(f"theta must be ({input.shape[0]}, 2, 3), got {tuple(theta.shape)}")
    work_dtype = input.dtype if input.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(device=input.device, dtype=work_dtype),
                         list(input.shape), align_corners=False)
    out = F.grid_sample(input.to(work_dtype), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    if label is None:
        return out, None
    if label.shape[0] != input.shape[0] or label.shape[-2:] != input.shape[-2:]:
        raise ValueError(f"label shape {tuple(label.shape)} does not match input "
                         f"{tuple(input.shape)}")
    if _is_classes(label):
        shares = torch.cat([label == 1, label == 2], dim=1).to(work_dtype)
        moved = F.grid_sample(shares, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        nodule = moved.sum(dim=1, keepdim=True) > 0.5
        malignant = moved[:, 1:2] >= moved[:, 0:1]
        return out, nodule.to(torch.uint8) * (1 + malignant.to(torch.uint8))
    moved = F.grid_sample(label.to(work_dtype), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
    return out, moved > 0.5


def _is_classes(label: torch.Tensor) -> bool:
    """Integer (not bool) labels are classes; bool and float ones are masks."""
    return not label.is_floating_point() and label.dtype != torch.bool


def _as_label(label: torch.Tensor | None) -> torch.Tensor | None:
    """A label as the augmentation returns it untransformed: a mask as bool, classes as
    uint8."""
    if label is None or label.dtype == torch.bool:
        return label
    return label.to(torch.uint8) if _is_classes(label) else label > 0.5


class SegmentationAugmentation(_DeviceRandom):
    """Per-sample flip, offset, scale, rotation and Gaussian noise from an :class:`AugmentConfig`.

    Randomness comes only from the module's own generators (one per device, all derived
    from ``seed``), or from ``generator`` for the device it lives on, never from torch's
    global RNG.  With every option off the forward pass is the identity.

    Rotation and scale act on normalised coordinates, so they are exact for square inputs
    (training crops are square); on non-square inputs a rotation also shears slightly.
    """

    def __init__(
        self,
        config: AugmentConfig | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(config if config is not None else AugmentConfig(), "augment", seed,
                         generator)

    def draw_transforms(
        self,
        n: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` random affine matrices, (N, 2, 3) float32 on ``device``.

        The same random numbers are drawn whichever options are on, so switching one
        option does not change what the others draw.
        """
        c = self.config
        linear, angle_u, offset_u = self._draw_flip_scale(n, 2, device, generator)
        if c.rotate:
            angle = angle_u * (2 * math.pi)
            cos, sin = torch.cos(angle), torch.sin(angle)
            rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
            linear = linear @ rotation
        # The translation column is what moves the image (the book wrote it to row 3).
        translation = offset_u * c.offset if c.offset > 0 else torch.zeros(n, 2, device=device)
        return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)

    # The deterministic half, also reachable from the module: replay a recorded draw with it.
    apply_affine = staticmethod(apply_affine)

    def forward(
        self, input: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``input`` (N, C, H, W) float and ``label`` (N, 1, H, W); a mask label
        returns bool, a class label uint8 classes."""
        if not self.enabled:
            return input, _as_label(label)
        if self.spatial:
            theta = self.draw_transforms(input.shape[0], input.device)
            input, label = apply_affine(input, label, theta)
        else:
            label = _as_label(label)
        return self.add_noise(input), label


# ----------------------------------------------------------------------------- 3D


def identity_transforms_3d(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` identity matrices, (N, 3, 4) float32."""
    theta = torch.zeros(n, 3, 4, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1.0
    return theta


def source_crop_irc(crop_irc: Sequence[int], config: CropAugmentConfig) -> tuple[int, int, int]:
    """The (I, R, C) crop to cut around a candidate so that no transform ``config`` can draw
    samples beyond it for a ``crop_irc`` output (so no edge padding is pulled in).

    Scale and offset reach ``(1 + scale + offset)`` half-sizes on each axis, an in-plane
    rotation by any angle the half-diagonal of the row-column plane; one voxel more serves
    the interpolation, and the size keeps ``crop_irc``'s parity so both share a centre.
    Flips alone map voxels onto voxels and need nothing more.
    """
    crop = tuple(int(n) for n in crop_irc)
    if not (config.offset > 0 or config.scale > 0 or config.rotate):
        return crop  # type: ignore[return-value]
    half = [n / 2 for n in crop]
    stretch = 1 + config.scale
    sizes = []
    for axis, (n, h) in enumerate(zip(crop, half)):
        reach = stretch * (math.hypot(half[1], half[2]) if config.rotate and axis else h)
        size = math.ceil(2 * (reach + config.offset * h) + 1)
        sizes.append(size + (size - n) % 2)
    return tuple(sizes)  # type: ignore[return-value]


def _centre_crop(input: torch.Tensor, crop_irc: Sequence[int]) -> torch.Tensor:
    starts = [(have - want) // 2 for have, want in zip(input.shape[2:], crop_irc)]
    return input[:, :, starts[0]:starts[0] + crop_irc[0], starts[1]:starts[1] + crop_irc[1],
                 starts[2]:starts[2] + crop_irc[2]]


def _check_source(shape: Sequence[int], crop_irc: Sequence[int]) -> None:
    if any(have < want or (have - want) % 2 for have, want in zip(shape, crop_irc)):
        raise ValueError(f"source crops {tuple(shape)} must be at least {tuple(crop_irc)} and "
                         f"differ from it by an even number per axis (a shared centre)")


def apply_crop_affine(input: torch.Tensor, theta: torch.Tensor,
                      crop_irc: Sequence[int] | None = None) -> torch.Tensor:
    """Resample source crops ``input`` (N, C, I', R', C') with per-sample ``theta`` into
    (N, C, *crop_irc) (default: the source size).

    ``theta`` (N, 3, 4) is in ``F.affine_grid``'s convention, axes (x, y, z) = (col, row,
    index): it maps output positions to input positions, in normalised units of the *output*
    crop (its half-size is 1 on each axis), so a draw means the same motion whatever margin
    the source has around it.  The source shares the output's centre; beyond its edge the
    edge value repeats.  An identity ``theta`` gives the source's centre exactly.
    """
    if input.dim() != 5:
        raise ValueError(f"input must be (N, C, I, R, C), got shape {tuple(input.shape)}")
    if theta.shape != (input.shape[0], 3, 4):
        raise ValueError(f"theta must be ({input.shape[0]}, 3, 4), got {tuple(theta.shape)}")
    source = tuple(input.shape[2:])
    crop = source if crop_irc is None else tuple(int(n) for n in crop_irc)
    _check_source(source, crop)
    work_dtype = input.dtype if input.is_floating_point() else torch.float32
    # Output half-size units -> the source's normalised units, row by row (x, y, z).
    ratio = torch.tensor([crop[2] / source[2], crop[1] / source[1], crop[0] / source[0]],
                         device=input.device, dtype=work_dtype)
    theta = theta.to(device=input.device, dtype=work_dtype) * ratio.view(1, 3, 1)
    grid = F.affine_grid(theta, [input.shape[0], input.shape[1], *crop], align_corners=False)
    return F.grid_sample(input.to(work_dtype), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


class CropAugmentation(_DeviceRandom):
    """Per-sample 3D flip, offset, scale, rotation about the index axis and Gaussian noise of
    classifier crops, from a :class:`CropAugmentConfig`, as one batched resampling.

    The input is a batch of source crops of :attr:`source_irc` (see :func:`source_crop_irc`)
    centred on the candidates; the output is the model's ``crop_irc``.  The transforms are
    built in voxel units, so a rotation is exact for any in-plane crop (square in voxels).
    With every option off the output is the source's centre, unchanged.
    """

    def __init__(self, config: CropAugmentConfig | None = None,
                 crop_irc: Sequence[int] = (32, 48, 48), *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(config if config is not None else CropAugmentConfig(),
                         "classifier augment", seed, generator)
        self.crop_irc = tuple(int(n) for n in crop_irc)
        if len(self.crop_irc) != 3 or min(self.crop_irc) < 1:
            raise ConfigError(f"crop_irc must be 3 sizes >= 1, got {tuple(crop_irc)}")
        self.source_irc = source_crop_irc(self.crop_irc, self.config)

    def draw_transforms(self, n: int, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` random affine matrices, (N, 3, 4) float32 on ``device``, in the
        convention of :func:`apply_crop_affine`.

        The same random numbers are drawn whichever options are on, so switching one
        option does not change what the others draw.
        """
        c = self.config
        # The linear part acts on voxel offsets from the centre.
        linear, angle_u, offset_u = self._draw_flip_scale(n, 3, device, generator)
        if c.rotate:
            angle = angle_u * (2 * math.pi)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero, one = torch.zeros_like(cos), torch.ones_like(cos)
            rotation = torch.stack([torch.stack([cos, -sin, zero], -1),
                                    torch.stack([sin, cos, zero], -1),
                                    torch.stack([zero, zero, one], -1)], -2)
            linear = linear @ rotation
        # In the output's normalised units (each axis its own half-size h): H^-1 L H.
        crop_i, crop_r, crop_c = self.crop_irc
        half = torch.tensor([crop_c, crop_r, crop_i], device=device, dtype=linear.dtype) / 2
        linear = linear * half.view(1, 1, 3) / half.view(1, 3, 1)
        translation = offset_u * c.offset if c.offset > 0 else torch.zeros(n, 3, device=device)
        return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)

    # The deterministic half, also reachable from the module: replay a recorded draw with it.
    apply_crop_affine = staticmethod(apply_crop_affine)

    def forward(self, input: torch.Tensor, label: torch.Tensor | None = None, *,
                theta: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment source crops (N, C, I', R', C') float into (N, C, *crop_irc); ``label``
        (one class per crop) comes back as it went in.  ``theta`` replays a recorded draw
        instead of drawing one (the noise is still drawn)."""
        if input.dim() != 5:
            raise ValueError(f"input must be (N, C, I, R, C), got shape {tuple(input.shape)}")
        _check_source(input.shape[2:], self.crop_irc)
        if theta is None and self.spatial:
            theta = self.draw_transforms(input.shape[0], input.device)
        if theta is not None:
            out = apply_crop_affine(input, theta, self.crop_irc)
        else:
            out = _centre_crop(input, self.crop_irc)
        return self.add_noise(out), label

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, crop_irc={self.crop_irc}, source_irc={self.source_irc}"
