"""A real ``maelab`` run that pauses after a known step until a stop signal arrives (for the signal tests).

    python signal_child.py STEP READY_DIR RANKS maelab-arguments...

Right after optimizer step STEP, each rank in RANKS ("all", or a comma-separated list) writes its pid
to ``READY_DIR/rank<R>`` and waits until a handler it installed for SIGTERM/SIGUSR1/SIGINT has run.
So the test's signal arrives mid-run at a known step on a fast or a slow machine, and the run must
stop at exactly STEP. Nothing else is changed: the run is ``maelab.cli.main``, its handlers are the
real ones (they are only wrapped to note that they ran). At the end each rank writes the exit code it
returns to ``READY_DIR/exit<R>`` (torchrun does not report its workers' codes when it was signaled).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
HOLD_LIMIT_S = 300.0
NOTED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))


def start(
    out: Path,
    step: int,
    args: list[str],
    ranks: str = "all",
    launcher: tuple[str, ...] = (sys.executable,),
) -> tuple[subprocess.Popen, Path]:
    """Start ``maelab pretrain --output out *args`` in its own process group (like a job); returns the process
    and its ready folder."""
    procs, ready = start_tasks(out, step, args, [{}], ranks, launcher)
    return procs[0], ready


def start_tasks(
    out: Path,
    step: int,
    args: list[str],
    envs: list[dict[str, str]],
    ranks: str = "all",
    launcher: tuple[str, ...] = (sys.executable,),
) -> tuple[list[subprocess.Popen], Path]:
    """Start one ``maelab pretrain --output out *args`` per entry of ``envs`` (added to this environment), all in
    one new process group (led by the first) as ``srun`` starts a job's tasks; returns the processes and their
    ready folder."""
    ready = out.parent / f"{out.name}.ready"
    ready.mkdir(parents=True)
    cmd = [*launcher, str(HERE), str(step), str(ready), ranks, "pretrain", "--output", str(out), *args]
    procs: list[subprocess.Popen] = []
    for env in envs:
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **env},
                process_group=procs[0].pid if procs else 0,
            )
        )
    return procs, ready


def wait_ready(
    proc: subprocess.Popen | list[subprocess.Popen],
    ready: Path,
    ranks: list[int],
    timeout: float = 120,
) -> dict[int, int]:
    """Wait until every rank in ``ranks`` holds at its step; returns their pids. Fails if a process (``proc``: one
    or a list) ends first."""
    procs = proc if isinstance(proc, list) else [proc]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = [ready / f"rank{r}" for r in ranks]
        if all(f.exists() for f in files):
            return {r: int(f.read_text()) for r, f in zip(ranks, files)}
        for p in procs:
            if p.poll() is not None:
                for other in procs:
                    other.kill()
                out, err = p.communicate()
                raise AssertionError(f"the run ended (code {p.returncode}) before holding:\n{out[-2000:]}{err[-3000:]}")
        time.sleep(0.02)
    for p in procs:
        p.kill()
    raise TimeoutError(ready)


def _hold_after(step: int, ready: Path, ranks: str) -> None:
    """Patch the loop to hold after ``step`` until a noted handler ran (see the module docstring)."""
    from maelab.engine.loop import Loop

    received: list[int] = []
    real_signal = signal.signal

    def noting_signal(sig: int, handler):  # type: ignore[no-untyped-def]
        if sig in NOTED and callable(handler):
            inner = handler

            def handler(signum, frame):  # type: ignore[no-untyped-def]
                received.append(signum)
                return inner(signum, frame)

        return real_signal(sig, handler)

    signal.signal = noting_signal  # type: ignore[assignment]
    train_step = Loop.train_step

    def holding_train_step(self, batches):  # type: ignore[no-untyped-def]
        loss = train_step(self, batches)
        rank = self.dist.rank
        if self.step == step and (ranks == "all" or str(rank) in ranks.split(",")):
            tmp = ready / f".rank{rank}"
            tmp.write_text(str(os.getpid()))
            tmp.replace(ready / f"rank{rank}")
            give_up = time.monotonic() + HOLD_LIMIT_S  # a test that failed before signalling leaves no orphan
            while not received:
                if time.monotonic() > give_up:
                    os._exit(3)
                time.sleep(0.01)
        return loss

    Loop.train_step = holding_train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    _hold_after(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    from maelab.cli import main

    code = main(sys.argv[4:])
    (Path(sys.argv[2]) / f"exit{os.environ.get('RANK', 0)}").write_text(str(code))  # torchrun does not tell
    sys.exit(code)
