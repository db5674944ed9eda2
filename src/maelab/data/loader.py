"""Deterministic, resumable data loading.

``ResumableSampler`` yields ``(index, sample_seed)`` pairs: a per-epoch permutation (seeded
by ``seed`` and the epoch), split across ranks like ``DistributedSampler``, that can start
part-way through an epoch. ``SeededDataset`` seeds torch's RNG with ``sample_seed`` before
loading, so every sample's augmentation depends only on (seed, epoch, index): not on the
number of workers, on which worker loads it, or on where a run was resumed.
Every DataLoader maelab builds is a :class:`SignalSafeDataLoader`: its workers leave SIGTERM,
SIGUSR1 and SIGINT to the main process (see :mod:`maelab.engine.signals`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from maelab.engine.signals import ignore_stop_signals, stop_signals_blocked

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (splitmix64 of the three numbers)."""
    z = (seed * 0x100000001B3 ^ epoch * _MIX ^ index * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch shuffled ``(index, sample_seed)`` pairs for this rank, from position ``start``."""

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.n = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.per_rank = num_samples // world_size
        else:
            self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` samples of this rank."""
        self.epoch = epoch
        self.start = start

    def order(self) -> list[int]:
        """This rank's indices for the current epoch (before ``start`` is applied)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(idx):  # pad by wrapping, like DistributedSampler
            idx += idx[: total - len(idx)]
        return idx[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.order()[self.start :]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


class SeededDataset(Dataset):
    """``ds[(index, seed)]``: seed torch's CPU generator, then ``ds[index]``.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every CUDA generator, which in the
    main process (``num_workers=0``) would make drop path and other GPU draws depend on the last sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        return seeded_call(seed, self.dataset.__getitem__, index)


def seeded_call(seed: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with torch's CPU generator seeded by ``seed``: in a DataLoader worker simply seeded (its RNG
    serves only the data), in the main process inside ``fork_rng``, leaving the training RNG (dropout, ...) alone."""
    if get_worker_info() is not None:
        torch.default_generator.manual_seed(seed)
        return fn(*args)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(*args)


class SignalSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes ignore SIGTERM, SIGUSR1 and SIGINT.

    A scheduler's or terminal's signal to the whole process group then reaches only the main
    process, which saves and stops, instead of killing a worker (torch's "DataLoader worker is
    killed by signal" error). Workers are forked with those signals blocked until their
    ``worker_init_fn`` (``ignore_stop_signals``, chained with the one given here) ignores them.
    """

    def __init__(self, dataset: Dataset, *, worker_init_fn: Callable[[int], Any] | None = None, **kwargs: Any) -> None:
        if sys.platform == "linux" and kwargs.get("num_workers", 0) > 0:
            # forked workers start with the stop signals blocked (see __iter__); the default turns to
            # forkserver in Python 3.14, whose workers would be exposed until their worker_init_fn runs
            kwargs.setdefault("multiprocessing_context", "fork")
        super().__init__(
            dataset, worker_init_fn=partial(ignore_stop_signals, init=worker_init_fn, parent=os.getpid()), **kwargs
        )

    def __iter__(self) -> Any:
        with stop_signals_blocked():  # workers (and persistent ones) are forked here
            return super().__iter__()


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: ResumableSampler,
    num_workers: int,
    pin_memory: bool = False,
    drop_last: bool = True,
) -> DataLoader:
    """DataLoader over ``SeededDataset(dataset)`` driven by ``sampler``; drops incomplete batches by default.

    Tuned for the training loop: workers live across epochs (``persistent_workers``: no
    re-fork and re-import per epoch), each keeps 4 batches in flight (``prefetch_factor=4``,
    so one slow file does not stall a step), and ``pin_memory`` (pass True on CUDA) puts the
    batches in page-locked memory, so the step's ``.to(device, non_blocking=True)`` overlaps
    compute. Batches come out in sampler order, which exact resumption relies on.
    """
    return SignalSafeDataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # its base seed is unused: samples seed themselves
    )
