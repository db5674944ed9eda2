"""What SIGTERM, SIGUSR1 and SIGINT do to a maelab run.

Schedulers deliver preemption to the main process only, or to every process of the job (SLURM's
``scancel``/time limit/``--signal``, ``timeout``, a Ctrl-C in a terminal: the whole process group,
DataLoader workers included). Either way only the training process reacts: :class:`StopFlag` notes
the signal, and the loop saves a checkpoint and exits cleanly. DataLoader workers ignore these
signals (:func:`ignore_stop_signals`, their ``worker_init_fn``; a SIGTERM from their parent still ends
them), so a group signal does not kill them under the loop's feet; they are forked with the signals
blocked (:func:`stop_signals_blocked`), so there is no moment between the fork and ``worker_init_fn``
in which one could.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

# SIGUSR1 does not exist on Windows
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None
)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold back STOP_SIGNALS in this thread (delivered on exit); processes forked meanwhile start with them
    blocked. No-op where ``pthread_sigmask`` does not exist."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals(worker_id: int, init: Callable[[int], Any] | None = None, parent: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: leave STOP_SIGNALS to the main process, then run ``init`` (the loader's
    own ``worker_init_fn``, if any). ``parent``: the pid of the process that owns the loader (default: this
    worker's parent process, which it is only under ``fork``; under ``forkserver``/``spawn`` pass it).

    SIGINT and SIGUSR1 are ignored (one pending since the fork is dropped). SIGTERM stays blocked and a
    thread waits for it: sent by the parent (how torch and multiprocessing end workers when the main
    process exits) it ends the worker, as torch's own worker handler does; from anyone else it is
    ignored. Where ``sigwaitinfo`` does not exist (macOS) SIGTERM keeps torch's handling.
    """
    others = [sig for sig in STOP_SIGNALS if sig != signal.SIGTERM]
    for sig in others:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # in every thread started from here on
        threading.Thread(
            target=_exit_on_sigterm_from,
            args=(os.getppid() if parent is None else parent,),
            name="maelab-sigterm",
            daemon=True,
        ).start()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, others)
    if init is not None:
        init(worker_id)


def _exit_on_sigterm_from(parent: int) -> None:
    """Wait for SIGTERMs (blocked in every thread of this worker); exit at once on one sent by ``parent``."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption) or a first Ctrl-C: the loop saves a checkpoint and
    exits cleanly. A second Ctrl-C aborts at once (the last checkpoint stays intact).

    Only the process that installed it reacts: a process forked meanwhile (a DataLoader worker before
    its ``worker_init_fn`` ran) inherits the handler, which does nothing there."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._received: int | None = None
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopFlag:
        self._pid = os.getpid()
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT:
            if self._received is not None:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to abort)")
        self._received = signum

    def agree(self, info: Any) -> None:
        """Make the signal visible (on every rank at the same step, under torch.distributed)."""
        if not info.enabled:
            self.signum = self._received
            return
        flag = torch.tensor([float(self._received or 0)])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item()) or None

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
