"""User-facing errors.

A :class:`MaelabError` is a user mistake (bad path, bad value, incompatible checkpoint,
unreadable image). The CLI prints its message as one line and exits non-zero; anything
else is an internal bug and keeps its traceback.

A MaelabError raised in a DataLoader worker process comes back to the main process as the
same class built from torch's text "Caught DataError in DataLoader worker process 0.
Original Traceback ...": the constructor recovers the original one-line message from it, so
every loader (CPU workers, the GPU-resident builder, the JPEG-decode loader, feature
extraction) reports a worker's error exactly as the main process would.
"""

from __future__ import annotations

_WRAPPED = "\nOriginal Traceback (most recent call last):\n"
"""What torch's ``ExceptionWrapper.reraise`` puts between "Caught X in ..." and the worker traceback."""


def original_message(cls: type[BaseException], text: str) -> str:
    """The message of a ``cls`` error re-raised from a DataLoader worker (``text``: torch's "Caught cls ...
    Original Traceback ..." wrapper, whose last entry reads ``module.Class: message``); other text as is."""
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if not (text.startswith(f"Caught {cls.__name__} ") and _WRAPPED in text and marker in text):
        return text
    return text.rsplit(marker, 1)[1].strip()


def error_summary(err: BaseException) -> str:
    """``Type: first sentence`` of a library's error, for the parentheses of a one-line message (torch's zip
    reader appends several sentences of advice; some messages span lines)."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first.split('. ')[0]}"


class MaelabError(Exception):
    """A user mistake, reported by the CLI as one line and a non-zero exit."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (original_message(type(self), args[0]),)
        super().__init__(*args)


class ConfigError(MaelabError, ValueError):
    """An invalid configuration value: the message names the field and what is allowed."""


class DataError(MaelabError):
    """Missing, empty or unreadable data."""


class CheckpointError(MaelabError):
    """A missing, corrupt or incompatible checkpoint."""


class NonFiniteLossError(MaelabError):
    """Training produced a NaN or infinite loss."""


class DeviceMemoryError(MaelabError):
    """The accelerator ran out of memory at the configured batch size."""
