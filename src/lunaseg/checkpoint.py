"""Checkpoint files of any lunaseg model (U-Net or classifier), and of the book's models.

A checkpoint is a ``torch.save``d dict of tensors and plain values only, written atomically,
so ``torch.load(weights_only=True)`` reads it without running pickled code (a file from an
untrusted source can at worst fail to load) and a killed save leaves the previous file whole.
It holds the book's keys (so the book's tools can read it) and lunaseg's: the model's
settings, its input spec, the training settings, RNG states and run history.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lunaseg import __version__
from lunaseg.errors import CheckpointError
from lunaseg.files import write_atomic

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "unwrap", "file_sha1",
           "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lunaseg-1"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` found in a file (book or lunaseg layout).

    ``model_config`` and ``spec`` are the stored dicts (None in the book's files); the model
    modules turn them into their typed configs.
    """

    path: str
    model_state: dict[str, torch.Tensor]
    model_config: dict | None
    spec: dict | None
    optimizer_state: dict | None
    epoch: int | None
    samples_seen: int | None
    config: dict | None
    sha1: str
    format: str  # "lunaseg-1" or "book"
    model_kind: str | None = None  # "segmentation" or "classifier" (lunaseg files)
    rng_state: dict | None = None
    extra: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)


def unwrap(model: nn.Module) -> nn.Module:
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


def file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    model_kind: str,
    model_config: dict | None,
    spec: dict | None,
    optimizer: torch.optim.Optimizer | None = None,
    config: dict | None = None,
    epoch: int,
    samples_seen: int,
    rng_state: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Write model (and optimizer) state to ``path`` atomically; return the file's SHA1."""
    path = Path(path)
    bare = unwrap(model)
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
        "model_kind": model_kind,
        "lunaseg_version": __version__,
        "torch_version": str(torch.__version__),  # TorchVersion is not plain data
        "model_config": _plain(model_config, "model_config"),
        "input_spec": _plain(spec, "input_spec"),
        "config": _plain(config, "config"),
        "samples_seen": int(samples_seen),
        "rng_state": _plain(rng_state, "rng_state"),
        "extra": _plain(extra, "extra"),
    }
    write_atomic(path, lambda handle: torch.save(payload, handle))
    sha1 = file_sha1(path)
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


def _dict_or_none(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


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
    samples = raw.get("samples_seen", raw.get("totalTrainingSamples_count"))
    epoch = raw.get("epoch")
    kind = raw.get("model_kind")
    return Checkpoint(
        path=str(path),
        model_state=_strip_prefixes(dict(state)),
        model_config=_dict_or_none(raw.get("model_config")),
        spec=_dict_or_none(raw.get("input_spec")),
        optimizer_state=_dict_or_none(raw.get("optimizer_state")),
        epoch=int(epoch) if isinstance(epoch, int) else None,
        samples_seen=int(samples) if isinstance(samples, int) else None,
        config=_dict_or_none(raw.get("config")),
        sha1=file_sha1(path),
        format=raw.get("format", "book") if isinstance(raw.get("format"), str) else "book",
        model_kind=kind if isinstance(kind, str) else None,
        rng_state=_dict_or_none(raw.get("rng_state")),
        extra=_dict_or_none(raw.get("extra")),
        raw=raw,
    )
