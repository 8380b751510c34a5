"""Where and how torch runs: device choice, bf16 autocast, slices per batch, RNG state.

Every stage that runs a model (training, validation, segmentation, the classifier) takes
these decisions from here, so they are made one way everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Mapping

import numpy as np
import torch

from lunaseg.errors import ConfigError

__all__ = ["resolve_device", "bf16_supported", "autocast", "in_float32", "whole_slice_batch",
           "crop_batch", "capture_rng_state", "restore_rng_state"]

# Slices per forward pass outside training when none is asked for: a GPU wants many; a CPU
# runs fastest with a few, whose activations stay in its caches (docs/benchmarks.md).
GPU_SLICES_PER_BATCH = 16
CPU_SLICES_PER_BATCH = 4
# Classifier crops (32 x 48 x 48, about one 272 x 272 slice of voxels) per forward pass.
GPU_CROPS_PER_BATCH = 256
CPU_CROPS_PER_BATCH = 32


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


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: always on CUDA, on a CPU only where oneDNN
    finds bf16 units (AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when ``enabled`` and :func:`bf16_supported`; a no-op elsewhere.

    CPUs without bf16 units (AVX2) ran bf16 about 15x slower than float32, so they never
    get it; one with AVX512-BF16 trained the U-Net 1.3-1.8x faster (docs/results.md).
    """
    if not enabled or not bf16_supported(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def in_float32(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in float32 even inside autocast: for a model's last layer, whose scores
    rank candidates (bf16 keeps 8 bits of them and ties close ones)."""
    if not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return layer(x.float())


def whole_slice_batch(device: torch.device, requested: int = 0) -> int:
    """Slices per forward pass when a model runs on whole slices (validation, segment).

    ``requested`` > 0 is used as it is; 0 picks the device's default.
    """
    if requested < 0:
        raise ConfigError(f"batch_size must be >= 0 (0 = auto), got {requested}")
    if requested:
        return requested
    return CPU_SLICES_PER_BATCH if device.type == "cpu" else GPU_SLICES_PER_BATCH


def crop_batch(device: torch.device, requested: int = 0) -> int:
    """Classifier crops per forward pass outside training; ``requested`` > 0 is used as it
    is, 0 picks the device's default."""
    if requested < 0:
        raise ConfigError(f"batch_size must be >= 0 (0 = auto), got {requested}")
    if requested:
        return requested
    return CPU_CROPS_PER_BATCH if device.type == "cpu" else GPU_CROPS_PER_BATCH


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
