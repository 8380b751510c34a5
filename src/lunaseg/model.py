"""The 2D U-Net over slice stacks (SPEC §7) and its checkpoints.

Module and attribute names are chosen so that ``state_dict`` keys equal those of the
book's model; its checkpoints therefore load with ``strict=True``.  Checkpoints are read
with ``torch.load(weights_only=True)``, which never runs pickled code, so a file from an
untrusted source can at worst fail to load.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import random
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lunaseg import __version__
from lunaseg.config import ModelConfig, from_dict, to_dict
from lunaseg.errors import CheckpointError, ConfigError

__all__ = [
    "UNet", "UNetWrapper", "build_model", "Checkpoint", "save_checkpoint", "load_checkpoint",
    "load_model", "infer_model_config", "capture_rng_state", "restore_rng_state",
    "CHECKPOINT_FORMAT",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lunaseg-1"
UP_MODES = ("upconv", "upsample")
# Keys of a checkpoint written by the book's training script.
BOOK_KEYS = (
    "sys_argv", "time", "model_state", "model_name", "optimizer_state", "optimizer_name",
    "epoch", "totalTrainingSamples_count",
)


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) -> CUDA when available, else CPU; anything else as torch reads it."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: not a torch device: {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available; "
                          "use 'cpu' or 'auto'")
    return resolved


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{name} must be an integer >= {minimum}, got {value!r}")


class UNet(nn.Module):
    """U-Net with ``depth`` levels and ``2**(wf + level)`` filters per level.

    Down-sampling is 2x2 average pooling (as in the book).  With ``padding`` the output
    has the input's height and width, which must then be multiples of ``2**(depth - 1)``.
    Returns raw scores (logits), shape (N, n_classes, H, W).
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
        multiple = 2 ** (self.depth - 1)
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
        return self.last(x)


class UNetWrapper(nn.Module):
    """BatchNorm over the input channels -> :class:`UNet` -> sigmoid probabilities.

    The input BatchNorm learns the HU scaling, so datasets need no normalisation step.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        c = self.config
        self.input_batchnorm = nn.BatchNorm2d(c.in_channels)
        self.unet = UNet(c.in_channels, c.n_classes, c.depth, c.wf, c.padding, c.batch_norm,
                         c.up_mode)
        self.final = nn.Sigmoid()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    # Kaiming assumes zero-mean pre-activations; a zero bias keeps that true
                    # (the book drew biases from a normal centred at -1/sqrt(fan_out)).
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.unet(self.input_batchnorm(x)))


def build_model(config: ModelConfig | None = None) -> UNetWrapper:
    """A freshly initialised :class:`UNetWrapper` for ``config`` (defaults: SPEC §7)."""
    return UNetWrapper(config if config is not None else ModelConfig())


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` found in a file (book or lunaseg layout)."""

    path: str
    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig
    optimizer_state: dict | None
    epoch: int | None
    samples_seen: int | None
    config: dict | None
    sha1: str
    format: str  # "lunaseg-1" or "book"
    rng_state: dict | None = None
    extra: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """``value`` as tensors (on the CPU), dicts, lists, tuples, strings, numbers and None.

    Anything else would make ``torch.load(weights_only=True)`` refuse the file later, so
    the error is raised now, at save time, naming the offending entry.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"checkpoint entry {where} has unsupported type {type(value).__name__}")


def capture_rng_state() -> dict:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as checkpoint-safe data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Undo :func:`capture_rng_state`; entries that are missing are left alone."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32)
        np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: dict | None = None,
    epoch: int,
    samples_seen: int,
    rng_state: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Write model (and optimizer) state to ``path`` atomically; return the file's SHA1.

    The dict holds the book's keys (so the book's tools can read it) and ours
    (``format``, ``model_config``, ``config``, ``samples_seen``, ``rng_state``, ``extra``).
    Only plain data is stored, so ``torch.load(weights_only=True)`` reads it.  A crash
    mid-write leaves any previous file at ``path`` intact (temp file + ``os.replace``).
    """
    path = Path(path)
    bare = _unwrap(model)
    model_config = getattr(bare, "config", None)
    payload = {
        # The book's layout.
        "sys_argv": list(sys.argv),
        "time": str(datetime.datetime.now()),
        "model_state": _plain(bare.state_dict(), "model_state"),
        "model_name": type(bare).__name__,
        "optimizer_state": _plain(optimizer.state_dict(), "optimizer_state") if optimizer else None,
        "optimizer_name": type(optimizer).__name__ if optimizer else None,
        "epoch": int(epoch),
        "totalTrainingSamples_count": int(samples_seen),
        # Ours.
        "format": CHECKPOINT_FORMAT,
        "lunaseg_version": __version__,
        "torch_version": str(torch.__version__),  # TorchVersion is not plain data
        "model_config": to_dict(model_config) if isinstance(model_config, ModelConfig) else None,
        "config": _plain(config, "config"),
        "samples_seen": int(samples_seen),
        "rng_state": _plain(rng_state, "rng_state"),
        "extra": _plain(extra, "extra"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file lives in the target folder so os.replace is a same-filesystem rename.
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    sha1 = _file_sha1(path)
    log.info("saved checkpoint %s (epoch %d, %d samples, sha1 %s)", path, epoch, samples_seen,
             sha1)
    return sha1


def _load_error_reason(error: BaseException) -> str:
    """A one-line reason from torch.load's (often multi-line) error message."""
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return f"refused to unpickle {blocked.group(1)} (only tensors and plain data are allowed)"
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        return (f"refused to unpickle: pickle opcode {opcode.group(1)} is not allowed "
                "(random bytes, or not a torch checkpoint)")
    if "Weights only load failed" in text:
        after = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = after[0].strip() if after and "WeightsUnpickler" in text else "unsafe content"
        return f"refused to unpickle: {detail[:160]}"
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines and lines[0].strip() != type(error).__name__ else ""
    if len(first) > 160:
        first = first[:157] + "..."
    kind = type(error).__name__
    return f"unreadable ({kind}: {first})" if first else f"unreadable ({kind})"


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") prefixes, if every key has one.
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


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
        if "unet.up_path.0.up.1.weight" in state:
            up_mode = "upsample"
        else:
            up_mode = "upconv"
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"model_state does not look like a lunaseg/book U-Net ({error})") \
            from None
    return ModelConfig(in_channels=int(in_channels), n_classes=int(n_classes), depth=depth,
                       wf=wf, padding=True, batch_norm=batch_norm, up_mode=up_mode)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a lunaseg or book checkpoint without executing any pickled code.

    ``torch.load(weights_only=True)`` accepts both the zip and the legacy (pre-1.6) format
    and, with ``map_location``, tensors saved from CUDA on a machine without CUDA.  Anything
    else raises :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            # E.g. "pickle protocol 4 detected": noise before the real verdict below.
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # any failure to parse means "not a checkpoint"
        raise CheckpointError(f"{path}: not a checkpoint: {_load_error_reason(error)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a checkpoint: holds a {type(raw).__name__}, not a dict")
    state = raw.get("model_state")
    if not isinstance(state, Mapping):
        hint = " (a bare state_dict?)" if any(k.startswith("unet.") for k in raw) else ""
        raise CheckpointError(f"{path}: not a checkpoint: no 'model_state' entry{hint}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: model_state holds entries that are not named tensors")
    state = _strip_prefixes(dict(state))

    if isinstance(raw.get("model_config"), dict):
        try:
            model_config = from_dict(ModelConfig, raw["model_config"])
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{path}: bad model_config: {error}") from None
    else:
        try:
            model_config = infer_model_config(state)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None

    samples = raw.get("samples_seen", raw.get("totalTrainingSamples_count"))
    epoch = raw.get("epoch")
    optimizer_state = raw.get("optimizer_state")
    return Checkpoint(
        path=str(path),
        model_state=state,
        model_config=model_config,
        optimizer_state=optimizer_state if isinstance(optimizer_state, dict) else None,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        samples_seen=int(samples) if isinstance(samples, int) else None,
        config=raw.get("config") if isinstance(raw.get("config"), dict) else None,
        sha1=_file_sha1(path),
        format=raw.get("format", "book") if isinstance(raw.get("format"), str) else "book",
        rng_state=raw.get("rng_state") if isinstance(raw.get("rng_state"), dict) else None,
        extra=raw.get("extra") if isinstance(raw.get("extra"), dict) else None,
        raw=raw,
    )


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[UNetWrapper, Checkpoint]:
    """A :class:`UNetWrapper` with the weights from ``path``, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    try:
        model = build_model(checkpoint.model_config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: model_config cannot build a model: {error}") from None
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        if len(detail) > 200:
            detail = detail[:197] + "..."
        raise CheckpointError(f"{path}: weights do not fit the model: {detail}") from None
    model.to(device)
    model.eval()
    log.info("loaded %s checkpoint %s (epoch %s, sha1 %s)", checkpoint.format, path,
             checkpoint.epoch, checkpoint.sha1)
    return model, checkpoint
