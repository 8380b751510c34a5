"""Exception types: every error a user can cause is one of these, with a one-line message."""

from __future__ import annotations

__all__ = ["LunasegError", "DataError", "ConfigError", "CheckpointError"]


class LunasegError(Exception):
    """Base class; the CLI prints ``str(error)`` as one line and exits non-zero."""


class DataError(LunasegError):
    """An input file or folder is missing, unreadable or inconsistent (the message names it)."""


class ConfigError(LunasegError):
    """An option has a value that cannot work (the message names the option and the value)."""


class CheckpointError(LunasegError):
    """A file is not a usable model checkpoint."""
