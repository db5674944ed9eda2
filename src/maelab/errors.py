"""User-facing errors.

A :class:`MaelabError` is a user mistake (bad path, bad value, incompatible checkpoint,
unreadable image). The CLI prints its message as one line and exits non-zero; anything
else is an internal bug and keeps its traceback.
"""

from __future__ import annotations


class MaelabError(Exception):
    """A user mistake, reported by the CLI as one line and a non-zero exit."""


class ConfigError(MaelabError, ValueError):
    """An invalid configuration value: the message names the field and what is allowed."""


class DataError(MaelabError):
    """Missing, empty or unreadable data."""


class CheckpointError(MaelabError):
    """A missing, corrupt or incompatible checkpoint."""


class NonFiniteLossError(MaelabError):
    """Training produced a NaN or infinite loss."""
