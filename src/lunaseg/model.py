"""The segmentation model: a 2D U-Net over slice stacks, and loading it from a checkpoint.

Module and attribute names are chosen so that ``state_dict`` keys equal those of the
book's model; its checkpoints therefore load with ``strict=True``.  Conv blocks are
(3x3 conv -> ReLU -> BatchNorm) x 2, down-sampling is 2x2 average pooling, the up path a
2x2 stride-2 transposed conv (or bilinear upsampling + 1x1 conv); with the defaults the
model has exactly the book's 118,271 parameters.

A model has one output class (nodule, sigmoid: the book's) or three (background, benign,
malignant, softmax: chapter exercise 3, 34 parameters more in the last 1x1 conv).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lunaseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, unwrap
from lunaseg.config import ModelConfig, from_dict, to_dict
from lunaseg.errors import CheckpointError, ConfigError
from lunaseg.inputs import SegmentationSpec, reach_px, size_multiple
from lunaseg.runtime import in_float32

__all__ = ["UNet", "UNetWrapper", "build_model", "load_model", "save_model",
           "infer_model_config", "model_spec", "default_spec", "nodule_probability",
           "check_classes", "MODEL_KIND", "CLASS_COUNTS"]

log = logging.getLogger(__name__)

MODEL_KIND = "segmentation"
UP_MODES = ("upconv", "upsample")
# Output classes a UNetWrapper can have: nodule (sigmoid), or background / benign /
# malignant (softmax, in lunaseg.luna's class order).
CLASS_COUNTS = (1, 3)


def check_classes(n_classes: object) -> None:
    """ConfigError unless ``n_classes`` is one of :data:`CLASS_COUNTS`."""
    if isinstance(n_classes, bool) or n_classes not in CLASS_COUNTS:
        raise ConfigError(f"model.n_classes must be 1 (nodule) or 3 (background, benign, "
                          f"malignant), got {n_classes!r}")


def nodule_probability(output: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) p(nodule) of a UNetWrapper's probabilities (N, 1 or 3, H, W): the
    sigmoid output itself, or 1 - p(background) of a 3-class softmax."""
    if output.shape[1] == 1:
        return output
    if output.shape[1] == 3:
        return 1 - output[:, :1]
    raise ValueError(f"expected 1 or 3 output channels, got {output.shape[1]}")


class _ConvBlock(nn.Module):
    """Two (3x3 conv -> ReLU -> BatchNorm) steps; ``block`` indices match the book's keys."""

    def __init__(self, in_size: int, out_size: int, padding: bool, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for step_in in (in_size, out_size):
            layers.append(nn.Conv2d(step_in, out_size, kernel_size=3, padding=int(padding)))
            layers.append(nn.ReLU(inplace=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_size))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _UpBlock(nn.Module):
    """Double the resolution, join the skip connection, then a conv block."""

    def __init__(
        self, in_size: int, out_size: int, up_mode: str, padding: bool, batch_norm: bool
    ) -> None:
        super().__init__()
        if up_mode == "upconv":
            self.up: nn.Module = nn.ConvTranspose2d(in_size, out_size, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(mode="bilinear", scale_factor=2, align_corners=False),
                nn.Conv2d(in_size, out_size, kernel_size=1),
            )
        # After concatenation the channels are out_size (upsampled) + out_size (skip) = in_size.
        self.conv_block = _ConvBlock(in_size, out_size, padding, batch_norm)

    @staticmethod
    def _center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # Only unpadded convs make the skip larger than the upsampled map.
        top = (skip.shape[-2] - height) // 2
        left = (skip.shape[-1] - width) // 2
        return skip[..., top:top + height, left:left + width]

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        skip = self._center_crop(skip, up.shape[-2], up.shape[-1])
        return self.conv_block(torch.cat([up, skip], dim=1))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{name} must be an integer >= {minimum}, got {value!r}")


class UNet(nn.Module):
    """U-Net with ``depth`` levels and ``2**(wf + level)`` filters per level.

    Down-sampling is 2x2 average pooling (as in the book).  With ``padding`` the output
    has the input's height and width, which must then be multiples of
    :func:`lunaseg.inputs.size_multiple` of the depth.  Returns raw scores (logits),
    shape (N, n_classes, H, W).
    """

    def __init__(
        self,
        in_channels: int = 7,
        n_classes: int = 1,
        depth: int = 3,
        wf: int = 4,
        padding: bool = True,
        batch_norm: bool = True,
        up_mode: str = "upconv",
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("n_classes", n_classes, 1)
        _check_int("depth", depth, 1)
        _check_int("wf", wf, 0)
        if up_mode not in UP_MODES:
            raise ConfigError(
                f"model.up_mode must be one of {', '.join(UP_MODES)}, got {up_mode!r}"
            )
        self.padding = bool(padding)
        self.depth = depth
        channels = in_channels
        self.down_path = nn.ModuleList()
        for level in range(depth):
            self.down_path.append(_ConvBlock(channels, 2 ** (wf + level), padding, batch_norm))
            channels = 2 ** (wf + level)
        self.up_path = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.up_path.append(_UpBlock(channels, 2 ** (wf + level), up_mode, padding, batch_norm))
            channels = 2 ** (wf + level)
        self.last = nn.Conv2d(channels, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = size_multiple(self.depth)
        if self.padding and (x.shape[-2] % multiple or x.shape[-1] % multiple):
            # Otherwise pooling drops a row/column and the output silently shrinks.
            raise ValueError(
                f"input height and width must be multiples of {multiple}, "
                f"got {tuple(x.shape[-2:])}"
            )
        skips = []
        for level, down in enumerate(self.down_path):
            x = down(x)
            if level < self.depth - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for up, skip in zip(self.up_path, reversed(skips)):
            x = up(x, skip)
        return in_float32(self.last, x)


class UNetWrapper(nn.Module):
    """BatchNorm over the input channels -> :class:`UNet` -> sigmoid probabilities (one class)
    or softmax probabilities over background, benign and malignant (three).

    The input BatchNorm learns the HU scaling, so datasets need no normalisation step.
    ``spec`` says how a CT becomes this model's input (:class:`SegmentationSpec`).
    """

    def __init__(self, config: ModelConfig | None = None,
                 spec: SegmentationSpec | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        c = self.config
        check_classes(c.n_classes)
        self.unet = UNet(c.in_channels, c.n_classes, c.depth, c.wf, c.padding, c.batch_norm,
                         c.up_mode)
        self.input_batchnorm = nn.BatchNorm2d(c.in_channels)
        # What the model's input must be; it travels with the weights in every checkpoint.
        self.spec = spec if spec is not None else default_spec(c)
        # Neither has weights, so the state_dict keys stay the book's.
        self.final = nn.Sigmoid() if c.n_classes == 1 else nn.Softmax(dim=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    # Kaiming assumes zero-mean pre-activations; a zero bias keeps that true
                    # (the book drew biases from a normal centred at -1/sqrt(fan_out)).
                    nn.init.zeros_(module.bias)

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net's raw scores (N, n_classes, H, W), before the sigmoid or softmax (they
        do not saturate)."""
        return self.unet(self.input_batchnorm(x))

    def forward(self, x: torch.Tensor, *, return_logits: bool = False) -> torch.Tensor:
        """Probabilities (N, n_classes, H, W); with ``return_logits`` the raw scores instead.

        Training takes the logits through ``forward`` (not :meth:`logits`) so that a
        DistributedDataParallel wrapper, which hooks only ``forward``, still syncs gradients.
        """
        logits = self.logits(x)
        return logits if return_logits else self.final(logits)


def build_model(config: ModelConfig | None = None,
                spec: SegmentationSpec | None = None) -> UNetWrapper:
    """A freshly initialised :class:`UNetWrapper` for ``config`` (default: the book's U-Net)."""
    return UNetWrapper(config if config is not None else ModelConfig(), spec)


def infer_model_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Rebuild the :class:`ModelConfig` that produced ``state`` from its keys and shapes.

    Used for the book's checkpoints, which store no hyper-parameters.  ``padding`` leaves
    no trace in the weights; the book always used ``True``, which is assumed.
    """
    try:
        first_conv = state["unet.down_path.0.block.0.weight"]
        levels = {int(m.group(1)) for key in state
                  if (m := re.match(r"unet\.down_path\.(\d+)\.", key))}
        depth = max(levels) + 1
        filters = first_conv.shape[0]
        wf = int(round(math.log2(filters)))
        if 2 ** wf != filters:
            raise ValueError(f"first layer has {filters} filters, not a power of two")
        if "input_batchnorm.weight" in state:
            in_channels = state["input_batchnorm.weight"].shape[0]
        else:
            in_channels = first_conv.shape[1]
        n_classes = state["unet.last.weight"].shape[0]
        # With BatchNorm, index 2 of a block is a 1-D BatchNorm weight; without it, a conv.
        batch_norm = state["unet.down_path.0.block.2.weight"].dim() == 1
        up_mode = "upsample" if "unet.up_path.0.up.1.weight" in state else "upconv"
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"model_state does not look like a lunaseg/book U-Net ({error})") \
            from None
    return ModelConfig(in_channels=int(in_channels), n_classes=int(n_classes), depth=depth,
                       wf=wf, padding=True, batch_norm=batch_norm, up_mode=up_mode)


def default_spec(config: ModelConfig, **fields) -> SegmentationSpec:
    """The input spec of a U-Net of this shape: context from its input channels, the size
    multiple and reach of its depth, and the spec's defaults for the rest (``fields``
    replace them)."""
    if config.in_channels % 2 == 0:
        raise ConfigError(f"model has {config.in_channels} input channels; expected an odd "
                          "number (one slice plus as many slices above as below)")
    return SegmentationSpec(**{"context_slices": (config.in_channels - 1) // 2,
                               "size_multiple": config.size_multiple,
                               "reach_px": reach_px(config.depth), **fields})


# The book's model, measured on real CT (docs/results.md): grouped as the book did, with
# four views that must all agree (benchmarks/bench_real.py).
BOOK_SPEC_FIELDS = {"grouping": "book", "tta": 4, "tta_rule": "consensus"}


def model_spec(checkpoint: Checkpoint, config: ModelConfig) -> SegmentationSpec:
    """The input spec a checkpoint's model was trained with.

    lunaseg files store it; the book's files get the book's input (HU in [-1000, 1000]) and
    the grouping chosen for the book's model; lunaseg files from before the spec was stored
    get lunaseg's defaults with the HU window of their training settings.
    """
    if checkpoint.spec is not None:
        try:
            spec = SegmentationSpec.from_dict(checkpoint.spec)
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{checkpoint.path}: bad input_spec: {error}") from None
    elif checkpoint.format == "book":
        spec = default_spec(config, **BOOK_SPEC_FIELDS)
    else:
        data = (checkpoint.config or {}).get("data") or {}
        window = {key: float(data[key]) for key in ("min_hu", "max_hu") if key in data}
        spec = default_spec(config, **window)
    if spec.channels != config.in_channels or spec.size_multiple != config.size_multiple:
        raise CheckpointError(f"{checkpoint.path}: input_spec ({spec.channels} channels, "
                              f"multiple {spec.size_multiple}) does not fit the model "
                              f"({config.in_channels} channels, multiple "
                              f"{config.size_multiple})")
    return spec


def _model_config(checkpoint: Checkpoint) -> ModelConfig:
    if checkpoint.model_kind not in (None, MODEL_KIND):
        raise CheckpointError(f"{checkpoint.path}: holds a {checkpoint.model_kind} model, "
                              f"not a segmentation U-Net")
    if checkpoint.model_config is not None:
        try:
            return from_dict(ModelConfig, checkpoint.model_config)
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{checkpoint.path}: bad model_config: {error}") from None
    try:
        return infer_model_config(checkpoint.model_state)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[UNetWrapper, Checkpoint]:
    """A :class:`UNetWrapper` with the weights and input spec from ``path`` (lunaseg's or the
    book's), in eval mode on ``device``, and what the file held."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    config = _model_config(checkpoint)
    try:
        model = build_model(config, model_spec(checkpoint, config))
    except ConfigError as error:
        raise CheckpointError(f"{path}: model_config cannot build a model: {error}") from None
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3]) if len(lines) > 1 else lines[0]
        if len(detail) > 200:
            detail = detail[:197] + "..."
        raise CheckpointError(f"{path}: weights do not fit the model: {detail}") from None
    model.to(device)
    model.eval()
    log.info("loaded %s checkpoint %s (epoch %s, sha1 %s)", checkpoint.format, path,
             checkpoint.epoch, checkpoint.sha1)
    return model, checkpoint


def save_model(path: str | Path, model: nn.Module, **fields) -> str:
    """Save a U-Net with its settings and input spec (see
    :func:`lunaseg.checkpoint.save_checkpoint` for ``fields``); returns the file's SHA1."""
    bare = unwrap(model)
    return save_checkpoint(path, model=bare, model_kind=MODEL_KIND,
                           model_config=to_dict(bare.config), spec=bare.spec.to_dict(),
                           **fields)
