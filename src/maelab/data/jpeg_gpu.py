"""JPEG folders decoded on the training device (``data.decode=gpu``).

The per-sample CPU pipeline (:func:`~maelab.data.transforms.pretrain_transform` in
DataLoader workers) spends most of its time in PIL's JPEG decoder. Here the workers only
read each file's bytes (plus its label); the main process decodes the whole batch with one
``decode_jpeg(list_of_byte_tensors, device=...)`` call (nvJPEG's batched decoder on CUDA,
libjpeg-turbo on CPU; TorchCodec's when it is installed, else torchvision's, see
:func:`decode_jpeg`), then crops, resizes, flips and normalizes each image on that device:

1. crop box and flip: torchvision's ``RandomResizedCrop`` / ``RandomHorizontalFlip``
   parameter draws, from torch's RNG seeded with ``sample_seed(seed, epoch, index)``
   exactly as the CPU path seeds it (:class:`~maelab.data.loader.SeededDataset`). So for an
   image decoded at the same size, both paths pick the *same* crop box and flip, and a run
   resumed mid-epoch continues exactly;
2. crop, antialiased bicubic resize and horizontal flip: on CPU one
   ``torchvision.transforms.v2.functional.resized_crop(..., BICUBIC, antialias=True)`` per uint8
   image (the CPU path's call and kernel); on CUDA the images of each decoded size at once, with
   torchvision's weights as two batched matmuls, clamped and rounded back to uint8 as
   torchvision's float resize on CUDA does (:meth:`JPEGDecodeLoader.resize`);
3. the batch [B, C, h, w] -> float32 / 255 -> ``(x - mean) / std``, as ``pretrain_transform``.

On CPU, libjpeg-turbo gives the same pixels as Pillow, so the output equals the CPU path's
bit for bit (tests/data/test_data_jpeg_gpu.py compares with ``torch.equal``; on CUDA, nvJPEG
and the float resize differ by up to a few uint8 levels). Files the GPU decoder should not see
go through Pillow in the worker
(:func:`maelab.data.images.load_image`, with the CPU path's conversions and reduced-size
decoding): non-JPEG files, JPEGs that are not RGB or grayscale (CMYK, ...), files missing
the end-of-image marker (truncated), and images above :data:`GPU_DECODE_MAX_PIXELS`.
Unreadable files follow the dataset's skip/strict policy
(:meth:`~maelab.data.folders.ImageFolderDataset.first_readable`); a file the device decoder
still rejects is decoded with Pillow in the main process (the rest of its batch still batched).

``data.decode=auto`` means ``cpu`` for now: ``gpu`` is the option to measure on a GPU
(against ``cpu``, same folder, batch size and workers) before it becomes a default. On CPU
(how it is tested) the two are close: BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maelab.config import DECODE_MODES
from maelab.data.folders import ImageFolderDataset
from maelab.data.gpu_crop import DEFAULT_RATIO, antialiased_resized_crop
from maelab.data.loader import ResumableSampler, SignalSafeDataLoader
from maelab.data.loaders import check_loader_args
from maelab.data.prefetch import normalize_uint8, stats_tensors
from maelab.data.transforms import Size, pair_size
from maelab.errors import DataError

log = logging.getLogger(__name__)

GPU_DECODE_MAX_PIXELS = 64_000_000
"""JPEGs larger than this (width * height) are decoded by Pillow in the worker (at the CPU path's reduced size)."""
EOI_SEARCH = 1024
"""The JPEG end-of-image marker must lie within this many bytes of the end of the file."""
_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"

__all__ = [
    "EncodedImageFolder",
    "JPEGDecodeLoader",
    "collate_encoded",
    "decode_jpeg",
    "device_decodable",
    "resolve_decode",
]

JPEGData = torch.Tensor | list[torch.Tensor]


def _jpeg_backend() -> tuple[str, Callable[[JPEGData, bool, torch.device], Any]]:
    """(name, decode(data, gray, device)): TorchCodec's ``decode_jpeg`` when it is installed, else torchvision's.

    TorchCodec (0.16+) supersedes torchvision's image decoders, which are deprecated since
    torchvision 0.29; both take the same list of CPU byte tensors, decode it with
    libjpeg-turbo on CPU or nvJPEG on CUDA, and give the same pixels on CPU.
    """
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode
    except Exception:  # noqa: BLE001 - not installed, or its native libraries failed to load
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as vision_decode

        def decode(data: JPEGData, gray: bool, device: torch.device) -> Any:
            with warnings.catch_warnings():  # the deprecation notice, once per batch otherwise
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
                mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
                return vision_decode(data, mode=mode, device=device)

        return "torchvision", decode

    def decode_codec(data: JPEGData, gray: bool, device: torch.device) -> Any:
        return codec_decode(data, mode="GRAY" if gray else "RGB", device=device)

    return "torchcodec", decode_codec


JPEG_BACKEND, _decode = _jpeg_backend()
"""Which library decodes: ``'torchcodec'`` or ``'torchvision'``."""


def decode_jpeg(data: JPEGData, channels: int = 3, device: torch.device | str = "cpu") -> Any:
    """JPEG bytes (uint8 [num_bytes] on CPU, or a list of them) -> uint8 [C, H, W] (or a list) on ``device``.

    ``channels`` 3 gives RGB (grayscale files are replicated), 1 gives grayscale. Raises
    RuntimeError for data the decoder rejects (a list fails as a whole).
    """
    return _decode(data, channels == 1, torch.device(device))


def resolve_decode(mode: str) -> str:
    """``data.decode`` -> ``'cpu'`` or ``'gpu'`` (``auto`` is ``cpu`` until GPU decoding is measured)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be auto, cpu or gpu, not {mode!r}")
    return "cpu" if mode == "auto" else mode


def device_decodable(data: bytes) -> bool:
    """Whether ``decode_jpeg`` should get these file bytes (else Pillow decodes them).

    True for a complete baseline/progressive JPEG (start and end markers present) whose
    header says RGB (YCbCr) or grayscale, with at most :data:`GPU_DECODE_MAX_PIXELS` pixels.
    Only the header is parsed. Either kind decodes to 1 or 3 channels (for 1 channel, a
    color JPEG gives libjpeg's luma plane, as Pillow's reduced-size ``draft('L')`` decode on
    the CPU path does).
    """
    if not data.startswith(_SOI) or data.rfind(_EOI, max(0, len(data) - EOI_SEARCH)) < 0:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            w, h = img.size
    except Exception:  # noqa: BLE001 - let Pillow's full decode report the problem
        return False
    return 0 < w * h <= GPU_DECODE_MAX_PIXELS


class EncodedImageFolder(Dataset):
    """``ds[(index, seed)] -> (payload, label, seed, file_index)`` for decoding on the device.

    ``payload`` is the file's bytes as uint8 [num_bytes] when :func:`device_decodable`, else
    the image decoded by Pillow in this (worker) process as uint8 [C, H, W] (the
    CPU path's :func:`~maelab.data.images.load_image`). Unreadable files follow ``folder``'s
    skip/strict policy: skipped ones are replaced by the next readable file (and its label),
    keeping ``seed``; ``file_index`` is the file actually read.
    """

    def __init__(self, folder: ImageFolderDataset) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def read(self, i: int) -> torch.Tensor:
        """Payload of file ``i``; raises DataError when it cannot be read."""
        path = self.folder.samples[i][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror or type(e).__name__}") from e
        if device_decodable(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return TF.pil_to_tensor(self.folder.load(i))

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = item
        i, payload = self.folder.first_readable(index, self.read)
        return payload, self.folder.samples[i][1], seed, i


EncodedBatch = tuple[list[torch.Tensor], torch.Tensor, list[int], list[int]]


def collate_encoded(items: list[tuple[torch.Tensor, int, int, int]]) -> EncodedBatch:
    """:class:`EncodedImageFolder` items -> (payloads, labels int64 [B], seeds, file indices)."""
    payloads, labels, seeds, files = zip(*items)
    return list(payloads), torch.tensor(labels, dtype=torch.int64), list(seeds), list(files)


class JPEGDecodeLoader:
    """One epoch of augmented batches ``(imgs float32 [B, C, h, w], labels int64 [B])`` on ``device``.

    A :class:`~maelab.data.loaders.BatchLoader` (``for imgs, labels in loader``; ``len``; the
    order is ``sampler``'s from ``sampler.start``, so call ``sampler.set_epoch(epoch, start)``
    before iterating). DataLoader workers read the files (:class:`EncodedImageFolder`), the
    main process decodes each batch on ``device`` with one ``decode_jpeg`` call and augments
    it (module docstring). Incomplete last batches are dropped. The augmentation is
    ``data.augment=random_crop`` (random resized crop + flip) only: another ``data.augment`` with
    ``data.decode=gpu`` is refused (:func:`maelab.data.pipeline.plan_training_set`).

    Args:
        folder: the training folder (its ``transform`` is not used).
        batch_size: images per batch.
        sampler: the run's :class:`~maelab.data.loader.ResumableSampler` over ``folder``.
        img_size: output size, int or (h, w).
        mean, std: per-channel normalization (``folder.channels`` values each).
        device: where to decode and augment (``cuda``: nvJPEG; ``cpu``: libjpeg-turbo).
        num_workers: file-reading worker processes (0: read in the main process).
        min_scale: RandomResizedCrop's smallest area fraction (aspect ratio 3/4..4/3).
        hflip: mirror half of the samples.
        ratio: RandomResizedCrop's aspect-ratio range.
    """

    def __init__(
        self,
        folder: ImageFolderDataset,
        batch_size: int,
        sampler: ResumableSampler,
        img_size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        num_workers: int = 0,
        min_scale: float = 0.2,
        hflip: bool = True,
        ratio: tuple[float, float] = DEFAULT_RATIO,
    ) -> None:
        if not isinstance(folder, ImageFolderDataset):
            raise ValueError(f"JPEGDecodeLoader needs an ImageFolderDataset, got {type(folder).__name__}")
        check_loader_args(
            mean, std, channels=folder.channels, batch_size=batch_size, sampler=sampler, num_items=len(folder)
        )
        self.folder = folder
        self.batch_size = batch_size
        self.sampler = sampler
        self.img_size = pair_size(img_size)
        self.device = torch.device(device)
        self.mean = list(mean)
        self.std = list(std)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std on the device (made once)
        self._decode_stream: torch.cuda.Stream | None = None  # allocates decode_jpeg's CUDA outputs
        self.hflip = hflip
        self.crop = v2.RandomResizedCrop(
            self.img_size, scale=(min_scale, 1.0), ratio=ratio, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        self.loader = SignalSafeDataLoader(
            EncodedImageFolder(folder),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_encoded,
            drop_last=True,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        """Full batches left in the epoch (from ``sampler.start``)."""
        return len(self.sampler) // self.batch_size

    # ---------------------------------------------------------------- decoding
    def _device_decode(self, data: JPEGData) -> Any:
        """:func:`decode_jpeg` on ``self.device``; on CUDA, made safe for memory the current stream still uses.

        nvJPEG (torchvision's ``decode_jpegs_cuda``) allocates its outputs while the caller's stream
        is current but writes them from a stream of its own, which does not wait for the caller's
        stream (and nvJPEG's hardware engine does not even wait for work queued on its own stream:
        pytorch/vision#9606, meta-pytorch/torchcodec#1634). The caching allocator hands a stream a
        block as soon as that stream frees it, so the decoder could be given memory that kernels
        of the training step still queued on the current stream are going to read or write: the
        decoded pixels or the step's tensors would be silently corrupted. So the outputs are
        allocated while a stream of this loader's own is current: its blocks are only ever used
        by the decoder, and are given back to it only after the current stream has finished with
        them (``record_stream``). The current stream then waits for the decode.
        """
        if self.device.type != "cuda":
            return decode_jpeg(data, self.folder.channels, self.device)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            out = decode_jpeg(data, self.folder.channels, self.device)
        current.wait_stream(self._decode_stream)
        for img in [out] if isinstance(out, torch.Tensor) else out:
            img.record_stream(current)
        return out

    def _pil(self, i: int) -> torch.Tensor:
        """File ``i`` decoded by Pillow (the CPU path's loader) -> uint8 [C, H, W] on the device."""
        return TF.pil_to_tensor(self.folder.load(i)).to(self.device)

    def _pil_fallback(self, i: int, labels: torch.Tensor, k: int) -> torch.Tensor:
        """File ``i``, which the device decoder rejected, by Pillow -> uint8 [C, H, W] on the device.

        A file Pillow cannot decode either follows the skip/strict policy (strict: DataError; else
        the next readable file, whose label goes to ``labels[k]``).
        """
        j, img = self.folder.first_readable(i, self._pil)
        labels[k] = self.folder.samples[j][1]
        return img

    def _decode_batched(
        self, payloads: Sequence[torch.Tensor], files: Sequence[int], labels: torch.Tensor, ks: Sequence[int]
    ) -> list[torch.Tensor]:
        """Payloads ``ks`` (file bytes) in one batched ``decode_jpeg`` call; if the decoder rejects the batch,
        each half is retried batched in turn, so only the files it rejects alone go to Pillow."""
        try:
            return list(self._device_decode([payloads[k] for k in ks]))
        except RuntimeError as e:
            if len(ks) == 1:
                log.debug("decode_jpeg refused %s (%s): decoding with Pillow", self.folder.samples[files[ks[0]]][0], e)
                return [self._pil_fallback(files[ks[0]], labels, ks[0])]
            log.debug("batched decode_jpeg failed (%s): retrying each half", e)
        half = len(ks) // 2
        return self._decode_batched(payloads, files, labels, ks[:half]) + self._decode_batched(
            payloads, files, labels, ks[half:]
        )

    def decode(
        self, payloads: Sequence[torch.Tensor], files: Sequence[int], labels: torch.Tensor
    ) -> list[torch.Tensor]:
        """Payloads (file bytes [num_bytes] or decoded uint8 [C, H, W]) -> uint8 [C, H, W] each, on the device.

        The encoded ones are decoded in one batched ``decode_jpeg`` call (split in halves around the files it
        rejects, :meth:`_decode_batched`). ``files`` are the payloads' file indices; ``labels`` [B] is
        updated where an undecodable file had to be replaced.
        """
        out: list[torch.Tensor | None] = [None] * len(payloads)
        encoded = [k for k, p in enumerate(payloads) if p.dim() == 1]
        for k, p in enumerate(payloads):
            if p.dim() != 1:
                out[k] = p.to(self.device, non_blocking=True)
        if encoded:
            for k, img in zip(encoded, self._decode_batched(payloads, files, labels, encoded)):
                out[k] = img
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- augmentation
    def params(
        self, seeds: Sequence[int], sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[tuple[int, int, int, int], bool]]:
        """``((top, left, h, w), flip)`` per sample: the CPU path's draws for each seed and (H, W) image size.

        For each sample torch's CPU generator is seeded with its seed (as
        :class:`~maelab.data.loader.SeededDataset` seeds it), then RandomResizedCrop's
        parameters and RandomHorizontalFlip's ``torch.rand(1) < 0.5`` are drawn in the order
        ``pretrain_transform`` draws them. The generator's state is restored afterwards.
        """
        make_params = getattr(self.crop, "make_params", None) or self.crop._get_params  # torchvision < 0.21
        gen = torch.default_generator
        state = gen.get_state()
        out = []
        try:
            for seed, (height, width) in zip(seeds, sizes):
                gen.manual_seed(seed)
                p = make_params([torch.empty((0, height, width))])
                flip = bool(torch.rand(1) < 0.5) if self.hflip else False
                out.append(((p["top"], p["left"], p["height"], p["width"]), flip))
        finally:
            gen.set_state(state)
        return out

    def resize(
        self, images: Sequence[torch.Tensor], params: Sequence[tuple[tuple[int, int, int, int], bool]], batched: bool
    ) -> list[torch.Tensor]:
        """Decoded uint8 [C, H_i, W_i] images -> their crops ``params`` (from :meth:`params`), resized to
        ``img_size`` (bicubic, antialiased) and flipped: uint8 [C, h, w] each.

        ``batched=False``: one torchvision ``resized_crop`` per image (on CPU its uint8 kernel, bit for bit the
        CPU path's). ``batched=True`` (CUDA): the images of each size at once, by torchvision's weights as
        two batched matmuls (:func:`~maelab.data.gpu_crop.antialiased_resized_crop`), clamped and rounded to
        uint8 as torchvision's float resize on CUDA does.
        """
        if not batched:
            out = []
            for img, ((top, left, h, w), flip) in zip(images, params):
                x = TF.resized_crop(
                    img, top, left, h, w, list(self.img_size), interpolation=InterpolationMode.BICUBIC, antialias=True
                )
                out.append(x.flip(-1) if flip else x)
            return out
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(k)
        resized: list[torch.Tensor | None] = [None] * len(images)
        for ks in groups.values():
            rows = torch.tensor([[*params[k][0], params[k][1]] for k in ks], dtype=torch.float32)  # box, flip
            if self.device.type == "cuda":  # pinned: the copy does not make the host wait for the GPU
                rows = rows.pin_memory()
            rows = rows.to(self.device, non_blocking=True)
            x = antialiased_resized_crop(
                torch.stack([images[k] for k in ks]), rows[:, :4], self.img_size, rows[:, 4] > 0
            )
            for k, img in zip(ks, x.clamp_(0, 255).round_().to(torch.uint8).unbind(0)):
                resized[k] = img
        return resized  # type: ignore[return-value]

    def augment(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> torch.Tensor:
        """Decoded uint8 [C, H_i, W_i] images -> float32 [B, C, h, w]: crop, resize, flip, normalize."""
        params = self.params(seeds, [(int(img.shape[-2]), int(img.shape[-1])) for img in images])
        batch = torch.stack(self.resize(images, params, batched=self.device.type != "cpu"))
        if self._stats is None or self._stats[0].device != batch.device:
            # once: from the lists, torchvision would copy them to the device (a blocking copy) every batch
            self._stats = stats_tensors(self.mean, self.std, batch.device)
        return normalize_uint8(batch, *self._stats)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for payloads, labels, seeds, files in self.loader:
            images = self.augment(self.decode(payloads, files, labels), seeds)
            yield images, labels.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return (
            f"JPEGDecodeLoader({len(self.folder)} files in {self.folder.root}, {JPEG_BACKEND} decode_jpeg on "
            f"{self.device}, batch_size={self.batch_size}, img_size={self.img_size}, scale={self.crop.scale}, "
            f"hflip={self.hflip}, workers={self.loader.num_workers})"
        )
