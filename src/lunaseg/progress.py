"""Progress bars for the loops a user waits for (tqdm), quiet where nobody watches.

Redirected to a file or a CI log, a bar's carriage-return updates become thousands of lines
of escape codes, so bars show only when stderr is a terminal; the stages still log a line
per epoch or file done.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

__all__ = ["bar"]


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar over ``iterable`` (or a manual one), shown when ``enabled`` and stderr is
    a terminal."""
    from tqdm import tqdm  # imported here so `lunaseg --help` stays instant

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, disable=not shown, dynamic_ncols=True, **kwargs)
