"""Random affine + noise augmentation of (input, label) batches, on their own device.

Unlike the book, every sample gets its own transform, and the offset is written to the
translation column of the 2x3 matrix, where ``F.affine_grid`` actually reads it.  Drawing
the parameters (:meth:`SegmentationAugmentation.draw_transforms`) is kept apart from
applying them (:func:`apply_affine`), so a draw can be logged and replayed.

A label is a mask (bool or float: nodule or not) or, for a 3-class model, integer classes
(0 background, 1 benign, 2 malignant), which stay integer classes.
"""

from __future__ import annotations

import logging
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from lunaseg.config import AugmentConfig
from lunaseg.errors import ConfigError

__all__ = ["SegmentationAugmentation", "apply_affine", "identity_transforms"]

log = logging.getLogger(__name__)


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


class SegmentationAugmentation(nn.Module):
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
        super().__init__()
        self.config = config if config is not None else AugmentConfig()
        c = self.config
        if not (c.offset >= 0.0 and math.isfinite(c.offset)):
            raise ConfigError(f"augment.offset must be >= 0, got {c.offset!r}")
        if not 0.0 <= c.scale < 1.0:
            # A factor 1 - scale <= 0 would collapse or mirror the image.
            raise ConfigError(f"augment.scale must be in [0, 1), got {c.scale!r}")
        if not (c.noise_hu >= 0.0 and math.isfinite(c.noise_hu)):
            raise ConfigError(f"augment.noise_hu must be >= 0, got {c.noise_hu!r}")
        if seed is None:
            # Drawn from the global RNG once, so torch.manual_seed still makes runs repeatable.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        if generator is not None:
            self._generators[self._device_key(generator.device)] = generator

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
        """Start every device's random stream afresh from ``seed`` (the trainer does this
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
        g = generator if generator is not None else self.generator(device)
        c = self.config
        flip_u = torch.rand(n, 2, device=device, generator=g)
        scale_u = torch.rand(n, 2, device=device, generator=g) * 2 - 1
        angle_u = torch.rand(n, device=device, generator=g)
        offset_u = torch.rand(n, 2, device=device, generator=g) * 2 - 1

        diagonal = torch.ones(n, 2, device=device)
        if c.flip:
            diagonal = torch.where(flip_u < 0.5, -diagonal, diagonal)
        if c.scale > 0:
            diagonal = diagonal * (1 + c.scale * scale_u)
        linear = torch.diag_embed(diagonal)
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

    def add_noise(self, input: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """``input`` plus Gaussian noise of sigma ``noise_hu`` (a no-op when it is 0)."""
        if self.config.noise_hu <= 0:
            return input
        g = generator if generator is not None else self.generator(input.device)
        noise = torch.randn(input.shape, device=input.device, dtype=input.dtype, generator=g)
        return input + noise * self.config.noise_hu

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

    def extra_repr(self) -> str:
        c = self.config
        return (f"flip={c.flip}, offset={c.offset}, scale={c.scale}, rotate={c.rotate}, "
                f"noise_hu={c.noise_hu}, seed={self.seed}")
