"""File IO shared by every stage: atomic writes, CSV writing and checked CSV reading.

Writes never leave half a file behind, for a reader or after a killed run or a full disk:
everything is written to a temporary sibling, flushed to disk, and renamed over the target,
which is atomic on one filesystem, so the old file stays whole until the new one is complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

from lunaseg.errors import DataError

__all__ = ["write_atomic", "write_bytes_atomic", "write_text_atomic", "write_json_atomic",
           "write_csv", "copy_atomic", "new_file_mode", "csv_rows", "csv_number"]


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0o644 for umask 022).

    Temporary files start as 0o600; renamed into place they would keep it.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``.

    The data is flushed and fsynced before the rename; on any failure the temporary file is
    removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:
            # A full disk fails on the temporary file's handle: name the file being written.
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` atomically (a kill mid-copy leaves the old ``path`` whole)."""
    with open(source, "rb") as handle:
        return write_atomic(path, lambda out: _copy_stream(handle, out))


def _copy_stream(source: BinaryIO, target: BinaryIO) -> None:
    while block := source.read(1 << 22):
        target.write(block)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Indented JSON; NaN and infinities are refused (they are not JSON)."""
    return write_text_atomic(json.dumps(data, indent=2, allow_nan=False) + "\n", path)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a headed CSV atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return write_text_atomic(buffer.getvalue(), path)


def csv_rows(path: Path, required: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield (line number, row) of a headed CSV after checking the header has ``required``."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = columns  # tolerate "seriesuid, coordX" style headers
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                                f"found {', '.join(columns) or 'no header'}")
            for row in reader:
                # reader.line_num is the physical line just read (header is line 1).
                yield reader.line_num, row
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a valid CSV file ({error})") from None


def csv_number(row: Mapping[str, str | None], key: str, path: Path, line: int) -> float:
    """``row[key]`` as a finite float, or a one-line DataError naming file, line and column."""
    text = row.get(key)
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{path}: line {line}: {key} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: line {line}: {key} is not finite: {text!r}")
    return value
