"""``metrics.jsonl`` (one record per epoch) and ``steps.jsonl`` (one per log interval): one JSON object
per line, append-only, truncated on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from maelab.io import atomic_write

STEP_LOG = "steps.jsonl"
"""Run-directory file of step-level records, one per ``log_every`` steps: ``step``, ``loss`` (mean over the
steps since the previous record, or since the epoch began), ``lr``, ``img_per_s``."""

ENV_FILE = "env.json"
"""Run-directory file written at every (re)start of a run: the environment of the latest one (python, torch,
torchvision, timm, maelab versions, git commit, device and its name; see
:func:`maelab.bench.measure.environment_info`)."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` ([] if it does not exist).

    Blank, truncated or otherwise corrupt lines (a crash mid-write, a file being written by a
    live run), non-UTF-8 bytes and lines that are not JSON objects are skipped.
    """
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records``, one JSON object per line, atomically (:func:`maelab.io.atomic_write`)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


class MetricsLog:
    """Append records to a ``.jsonl`` file; ``keep_completed(n, s)`` drops later epochs/steps on resume.

    Records with an ``epoch`` key are per epoch; step-level records (``steps.jsonl``) have only ``step``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def keep_completed(self, epochs_done: int, steps_done: int | None = None) -> None:
        """Keep only records of the first ``epochs_done`` epochs and, for step-level records (no
        ``epoch`` key), of the first ``steps_done`` steps: a resumed run redoes the rest."""

        def done(r: dict[str, Any]) -> bool:
            if "epoch" in r or steps_done is None:
                return r.get("epoch", 0) <= epochs_done
            return r.get("step", 0) <= steps_done

        write_records(self.path, [r for r in read_records(self.path) if done(r)])

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)
