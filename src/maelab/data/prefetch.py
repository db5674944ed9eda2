"""Move uint8 batches to the training device ahead of use, and normalize them there.

The per-sample CPU pipeline ends its transform with the crop and flip
(``pretrain_transform(..., normalize=False)``): workers hand over uint8 [B, C, H, W] batches,
a quarter of the bytes of float32, and skip the float work. :class:`DeviceBatches` copies
batch k+1 to the GPU on a side stream while step k runs (from pinned memory, so the copy is
asynchronous), then converts to float32 in [0, 1] and normalizes with torchvision's own
functions: the values equal those of the float CPU pipeline (tested on CPU, where the same
functions run on the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from maelab.data.loaders import check_loader_args


def normalize_uint8(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std``, exactly as ``ToDtype(scale=True)`` +
    ``Normalize`` compute it per sample.

    ``mean`` and ``std`` may be float32 tensors [C] already on the images' device (see
    :func:`stats_tensors`): torchvision then uses them as they are. Given as Python numbers,
    torchvision builds them on the device at every call, a blocking host-to-device copy (on
    CUDA, a wait for everything queued on the current stream)."""
    if not isinstance(mean, torch.Tensor):
        mean = list(mean)
    if not isinstance(std, torch.Tensor):
        std = list(std)
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), mean=mean, std=std)


def stats_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors [C] on ``device``: the tensors torchvision's ``normalize``
    would build from the lists (same values), made once instead of once per batch."""
    if not all(float(s) != 0.0 for s in std):
        raise ValueError(f"std evaluated to zero, leading to division by zero: {tuple(std)}")
    return (
        torch.tensor([float(m) for m in mean], dtype=torch.float32, device=device),
        torch.tensor([float(s) for s in std], dtype=torch.float32, device=device),
    )


class DeviceBatches:
    """Wrap a loader of (uint8 images [B, C, H, W], labels [B]); yield (float32 normalized images on
    ``device``, labels): a :class:`~maelab.data.loaders.BatchLoader`. On CUDA the next batch is copied
    on a side stream while the current one is used; elsewhere batches are converted in place of use.
    Labels stay where the loader put them; ``len`` is the wrapped loader's."""

    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        check_loader_args(mean, std)
        self.loader = loader
        self.device = torch.device(device)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # made on the device at the first batch, then reused: built from the lists at every batch they
        # would cost two blocking copies per batch, i.e. the host waiting for the previous training step
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _device_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            self._stats = stats_tensors(self.mean, self.std, self.device)
        return self._stats

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, ... of the wrapped DataLoader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for images, labels in self.loader:
                yield normalize_uint8(images.to(self.device), *self._device_stats()), labels
            return
        self._device_stats()  # before the loop: this one blocking copy happens once, not per batch
        stream = torch.cuda.Stream(self.device)
        pending: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event] | None = None
        for images, labels in self.loader:
            with torch.cuda.stream(stream):
                staged = images.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            if pending is not None:
                yield self._ready(*pending)
            pending = (staged, labels, copied)
        if pending is not None:
            yield self._ready(*pending)

    def _ready(
        self, staged: torch.Tensor, labels: torch.Tensor, copied: torch.cuda.Event
    ) -> tuple[torch.Tensor, torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)  # this batch's copy has landed (not the next one's)
        staged.record_stream(current)  # its memory is not reused while the current stream may still read it
        return normalize_uint8(staged, *self._device_stats()), labels

    def __repr__(self) -> str:
        prefetch = "1 batch" if self.device.type == "cuda" else "none"
        return f"DeviceBatches(uint8 batches -> {self.device}, prefetch={prefetch})"
