"""Atomic file writes: a reader (or a killed run) never sees half a file.

Everything is written to a temporary sibling and renamed over the target, which is atomic
on one filesystem; the old file stays whole until the new one is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["write_atomic", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Indented JSON; NaN and infinities are refused (they are not JSON)."""
    return write_text_atomic(json.dumps(data, indent=2, allow_nan=False) + "\n", path)
