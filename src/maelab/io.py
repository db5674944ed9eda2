"""Atomic file writes: the one writer of the files maelab produces (checkpoints, eval.json, env.json, embeddings,
reports, figures, exported encoders and Hugging Face directories, shard indexes, rewritten metrics logs).

The content goes to a temporary file in the target's folder, is flushed and fsynced, and the temporary
file is renamed over the target, so a crash mid-write never leaves a partial file under the target's
name. A write that fails (a full disk, a file-size limit, no permission) ends as one
:class:`~maelab.errors.MaelabError` line naming the file and the reason and saying whether a previous
file is intact; the temporary file is removed in every case.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from maelab.errors import MaelabError

_TORCH_WRITER_FAILED = ("unexpected pos", "PytorchStreamWriter failed")
"""What torch.save's zip writer raises (a RuntimeError) when a write stops partway."""
_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")
_COUNTER = itertools.count()


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, or None when ``err`` is not a failed write (an internal bug).

    A write failure is an OSError, or a RuntimeError of a writer that hit one: torch.save reports a
    full disk or a file-size limit as ``RuntimeError: [enforce fail at inline_container.cc:...] .
    unexpected pos ...`` with the OSError on ``__context__`` (or nowhere, writing to a path)."""
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e.strerror or str(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    first = (str(err).strip().splitlines() or [""])[0]
    if any(s in first for s in _TORCH_WRITER_FAILED):
        return f"the write stopped partway: {_ENFORCE_PREFIX.sub('', first)}"
    return None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (fsync of the directory, where the filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not supported on every filesystem
        pass


@contextmanager
def atomic_path(path: str | Path, what: str = "", error: type[MaelabError] = MaelabError) -> Iterator[Path]:
    """A temporary path next to ``path`` to create the file at; renamed over ``path`` when the block ends.

    The block must leave the temporary file complete and flushed (:func:`atomic_write` does). A write
    failure (:func:`write_failure`) in the block or the rename raises ``error``: "cannot write {what}
    {path} ({reason}); the previous {name} is intact" (or "nothing was saved"). Any other error passes
    through. The temporary file never outlives the block."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{next(_COUNTER)}.tmp")  # unique to this process and call
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, p)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        kept = f"the previous {p.name} is intact" if p.exists() else "nothing was saved"
        raise error(" ".join(filter(None, ["cannot write", what, f"{p} ({reason}); {kept}"]))) from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(p.parent)


def write_synced(path: Path, content: bytes | Callable[[BinaryIO], object]) -> None:
    """Create ``path`` with ``content`` (bytes, or a function writing to a binary file), flushed and fsynced."""
    with open(path, "wb") as f:
        if isinstance(content, bytes):
            f.write(content)
        else:
            content(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(
    path: str | Path,
    content: bytes | Callable[[BinaryIO], object],
    what: str = "",
    error: type[MaelabError] = MaelabError,
) -> Path:
    """Write ``content`` (bytes, or a function writing to a binary file) to ``path`` atomically: temp file
    + flush + fsync + rename (:func:`write_synced` in :func:`atomic_path`, which says the error). Returns
    ``path`` as a Path.

    ``what`` names the file in the error ("checkpoint", "the report"); ``error``: the MaelabError class
    to raise on a failed write."""
    with atomic_path(path, what, error) as tmp:
        write_synced(tmp, content)
    return Path(path)


def write_json(obj: Any, path: str | Path, indent: int = 2) -> Path:
    """``obj`` as JSON (values JSON cannot hold as their ``str``) to ``path``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())
