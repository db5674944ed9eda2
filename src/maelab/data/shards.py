"""WebDataset tar shards: written by ``maelab shard``, streamed for pre-training.

A shard spec is a brace pattern of local tar files (``shards/train-{000000..000127}.tar``) or a
directory written by :func:`write_shards` (its ``index.json`` lists the shards, their sample
counts and the class names). Tar reading, brace expansion, the sample buffer and the writer are
the ``webdataset`` library's own; this module decides who reads what, in which order.

The stream of one epoch (:class:`ShardStream`):

- the shard list is shuffled with a generator seeded by (seed, epoch);
- it is split over ``world_size x W`` *slots* (``W`` = DataLoader workers, at least 1): slot
  ``rank * W + w`` reads shards ``slot, slot + slots, ...``; with fewer shards than slots, the slots
  sharing a shard keep every m-th sample of it (so every sample still has one reader);
- each slot's samples pass through a buffer of :data:`SHUFFLE_BUFFER` samples whose generator is
  seeded by (seed, epoch, slot), and repeat (next pass) when the slot has fewer samples than its
  share of the epoch;
- the epoch has ``num_samples // world_size`` samples per rank (``num_samples`` from ``index.json``,
  else counted once from the tars): batch ``b`` of a rank comes from slot ``b % W``, which is the
  order in which the DataLoader collects its workers' batches;
- each sample's augmentation is seeded by (seed, epoch, its key), as folders seed by index.

Resume: a run stopped after ``k`` batches of an epoch replays that epoch's streams, each slot
passing over (reading, not decoding) the samples of its batches before ``k``, and continues with
batch ``k``: with the same world size and ``data.num_workers`` the resumed run sees exactly the
batches the uninterrupted run would have seen. With another world size or worker count the rest
of the interrupted epoch is drawn from the new layout (the next epochs are again exact).

Unreadable images are replaced by the next readable sample of the same stream (the batch keeps its
size; the stand-in is augmented with the bad sample's seed), or stop the run with ``data.strict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from itertools import count, islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from maelab.data.folders import IMG_EXTENSIONS, ImageFolderDataset, warn_skipped
from maelab.data.images import load_image
from maelab.data.loader import SignalSafeDataLoader, sample_seed, seeded_call
from maelab.errors import DataError
from maelab.io import write_json

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
"""Written next to the shards by :func:`write_shards`: shard names, sample counts, class names."""
SHUFFLE_BUFFER = 1000
"""Samples in each slot's shuffle buffer (webdataset's default); the first one leaves after 100."""
IMAGE_FIELDS = tuple(ext[1:] for ext in IMG_EXTENSIONS)
"""Sample fields (tar member extensions) that hold an encoded image."""


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError as e:
        raise DataError("WebDataset shards need the webdataset package: pip install 'maelab[shards]'") from e
    return webdataset


def _tar_key(relative: Path) -> str:
    """Sample key of an image at ``relative`` (a path below the folder): the path without its extension,
    with '.' written as %2E (webdataset takes a member's key up to the first dot of its name)."""
    stem = relative.with_suffix("").as_posix()
    return stem.replace("%", "%25").replace(".", "%2E")


def _path_of_key(key: str) -> str:
    """The relative path (without extension) a key of :func:`_tar_key` stands for."""
    return key.replace("%2E", ".").replace("%25", "%")


def write_shards(folder: str | Path, output: str | Path, shard_size: int) -> dict[str, Any]:
    """Write the images of ``folder`` as WebDataset shards ``output/shard-NNNNNN.tar`` (webdataset's
    ShardWriter), ``shard_size`` samples each, and ``output/index.json``; returns the index.

    Samples keep the files' encoded bytes (field = the lower-case extension), the key is the relative
    path (:func:`_tar_key`), and a labeled (ImageFolder) folder adds the class index as ``cls``.
    Files are stored in the folder's sorted scan order; nothing is decoded.
    """
    if shard_size < 1:
        raise DataError(f"invalid --shard-size {shard_size}: a positive number of samples per shard")
    wds = _webdataset()
    src = ImageFolderDataset(folder)
    out = Path(output).expanduser()
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise DataError(f"{out} already holds shards: choose an empty --output")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for path, label in src.samples:
            rel = Path(path).relative_to(src.root)
            sample: dict[str, Any] = {"__key__": _tar_key(rel), rel.suffix[1:].lower(): Path(path).read_bytes()}
            if src.labeled:
                sample["cls"] = label
            sink.write(sample)
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    index = {
        "format": "webdataset",
        "num_samples": len(src.samples),
        "classes": src.classes,
        "shards": [{"name": n, "num_samples": c} for n, c in counts.items()],
    }
    write_json(index, out / INDEX_FILE, indent=1)
    return index


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
        index["shards"] = [dict(name=str(s["name"]), num_samples=int(s["num_samples"])) for s in index["shards"]]
        return index
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read shard index {path}: {e}") from e


def is_shard_spec(name: str) -> bool:
    """Whether data.name names WebDataset shards: ``*.tar`` (with braces) or a directory with an index.json
    of format webdataset."""
    if name.endswith(".tar"):
        return True
    index = Path(name).expanduser() / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == "webdataset"
    except (OSError, ValueError, AttributeError):
        return False


def _count_samples(url: str) -> int:
    return sum(1 for _ in _webdataset().tariterators.tarfile_samples([{"url": url}]))


def resolve_shards(spec: str) -> tuple[list[str], list[int], list[str]]:
    """``(shard paths, samples per shard, class names)`` of a shard spec (see :func:`is_shard_spec`).

    Counts come from ``index.json`` (in the directory, or next to the shards and listing them all);
    otherwise each tar is read once and its samples counted.

    Raises:
        DataError: a pattern that expands to nothing, a missing shard, an unreadable index or tar.
    """
    root = Path(spec).expanduser()
    if root.is_dir():
        index = _read_index(root / INDEX_FILE)
        urls = [str(root / s["name"]) for s in index["shards"]]
    else:
        from braceexpand import braceexpand  # a webdataset dependency

        urls = [str(Path(u).expanduser()) for u in braceexpand(spec)]
        index = None
        sidecar = Path(urls[0]).parent / INDEX_FILE if urls else None
        if sidecar is not None and sidecar.is_file():
            index = _read_index(sidecar)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}, from data.name={spec!r}")
    known = {str(Path(urls[0]).parent / s["name"]): s["num_samples"] for s in index["shards"]} if index else {}
    if not all(u in known for u in urls):
        log.info("counting the samples of %d shards (maelab shard writes index.json to skip this)", len(urls))
        try:
            known = {u: _count_samples(u) for u in urls}
        except Exception as e:  # noqa: BLE001 - a tar that cannot be read is a data problem
            raise DataError(f"cannot read shards {spec!r}: {e}") from e
    return urls, [known[u] for u in urls], list(index.get("classes", [])) if index else []


def slot_plan(shards: list[str], slot: int, slots: int) -> list[tuple[str, int, int]]:
    """What slot ``slot`` of ``slots`` reads: ``(shard, m, r)``, keep the samples at positions ``p % m == r``.

    Whole shards ``slot, slot + slots, ...`` when there are at least as many shards as slots; else shard
    ``slot % len(shards)``, shared with the other slots that map to it, each keeping every m-th sample."""
    n = len(shards)
    if n >= slots:
        return [(s, 1, 0) for s in shards[slot::slots]]
    j = slot % n
    return [(shards[j], len(range(j, slots, n)), slot // n)]


def _key_index(key: str, pass_: int) -> int:
    """A stable integer for a sample key (and the pass over the slot's shards) to seed its augmentation."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{pass_}".encode(), digest_size=8).digest(), "little") >> 1


class ShardStream(IterableDataset):
    """Pre-training samples ``(transform(image), label)`` streamed from WebDataset shards (see the module doc).

    It is its own sampler: :meth:`set_epoch` selects the epoch and the position to start from, ``len()`` is
    the number of samples of an epoch (all ranks), :attr:`samples_per_rank` this rank's share.

    Args:
        spec: shard pattern or shard directory (:func:`resolve_shards`).
        transform: applied to the PIL image ('RGB' or 'L') after seeding torch's RNG for the sample.
        channels: 1 or 3. strict: raise on the first unreadable image. target_size: reduced decode size of
        huge images (:func:`~maelab.data.images.load_image`). seed: shuffling and augmentation seed.
        rank, world_size: this process and the number of processes.
    """

    def __init__(
        self,
        spec: str,
        transform: Callable[[Image.Image], Any] | None = None,
        channels: int = 3,
        strict: bool = False,
        target_size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"shards {spec} give 1 or 3 channels, not {channels}")
        self.spec = spec
        self.urls, self.counts, self.classes = resolve_shards(spec)
        self.labeled = bool(self.classes)
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise DataError(f"no samples in the shards {spec!r}")
        self.transform, self.channels, self.strict, self.target_size = transform, channels, strict, target_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.samples_per_rank = self.num_samples // world_size
        self.batch_size, self.num_workers = 1, 0
        self.epoch, self.start = 0, 0
        self.num_skipped = 0
        self._bad: set[str] = set()

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Stream epoch ``epoch`` from this rank's sample ``start`` (a multiple of the batch size)."""
        self.epoch, self.start = epoch, start

    def set_batching(self, batch_size: int, num_workers: int) -> None:
        """The loader's batch size and worker count: they decide which worker streams which batches."""
        self.batch_size, self.num_workers = batch_size, num_workers

    def epoch_shards(self) -> list[str]:
        """The shard list of the current epoch, shuffled by (seed, epoch)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]

    def _read(self, plan: list[tuple[str, int, int]], pass_: int) -> Iterator[dict[str, Any]]:
        """One pass over the plan's samples (raw bytes), tagged with ``__pass__``."""
        tar_samples = _webdataset().tariterators.tarfile_samples
        for url, m, r in plan:
            try:
                for pos, sample in enumerate(tar_samples([{"url": url}])):
                    if pos % m == r:
                        yield dict(sample, __pass__=pass_)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - a broken tar is a data problem
                raise DataError(f"cannot read shard {url}: {e}") from e

    def slot_samples(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """Slot ``slot``'s endless stream of raw samples for the current epoch: pass after pass over its
        shards, each pass through the buffer (emptied at the end of a pass) of one seeded generator."""
        rng = random.Random(sample_seed(self.seed, self.epoch, -2 - slot))
        shuffle = _webdataset().filters.shuffle(SHUFFLE_BUFFER, 100, rng=rng)
        plan = slot_plan(self.epoch_shards(), slot, slots)
        for pass_ in count():
            found = 0
            for sample in shuffle(self._read(plan, pass_)):
                found += 1
                yield sample
            if not found:
                raise DataError(f"no samples in shard(s) {', '.join(u for u, _, _ in plan)}")

    @staticmethod
    def sample_name(sample: dict[str, Any]) -> str:
        """``SHARD:KEY``, what errors call a sample."""
        return f"{sample.get('__url__', '?')}:{sample['__key__']}"

    def decode(self, sample: dict[str, Any]) -> Image.Image:
        """The sample's image ('RGB' or 'L'); DataError when it has none or it is unreadable."""
        name = self.sample_name(sample)
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            raise DataError(f"cannot read image {name}: no image field ({', '.join(IMAGE_FIELDS)}) in the sample")
        return load_image(sample[field], channels=self.channels, target_size=self.target_size, name=name)

    def _try_decode(self, sample: dict[str, Any]) -> Image.Image | None:
        """The image, or None for an unreadable sample (warned about and counted once per process)."""
        name = self.sample_name(sample)
        if name in self._bad:
            return None
        try:
            return self.decode(sample)
        except DataError as e:
            if self.strict:
                raise
            self._bad.add(name)
            self.num_skipped += 1
            warn_skipped(self.num_skipped, e, self.spec)
            return None

    def readable(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Image.Image, int]]:
        """``(sample, image, label)`` for each raw sample; an unreadable one gets the image and label of the
        next readable sample of the stream (looked ahead, then read again in its own turn)."""
        ahead: deque[dict[str, Any]] = deque()
        while True:
            sample = ahead.popleft() if ahead else next(samples, None)
            if sample is None:
                return
            img, stand_in, i = self._try_decode(sample), sample, 0
            while img is None:
                if i == len(ahead):
                    nxt = next(samples, None)
                    if nxt is None or i > self.num_samples:
                        raise DataError(f"no readable image in the shards {self.spec!r} (see the warnings above)")
                    ahead.append(nxt)
                stand_in, i = ahead[i], i + 1
                img = self._try_decode(stand_in)
            yield sample, img, int(stand_in["cls"]) if "cls" in stand_in else -1

    def _item(self, img: Image.Image, label: int) -> tuple[Any, int]:
        return (self.transform(img) if self.transform is not None else img), label

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        """This worker's samples: the batches ``b >= start`` of this rank with ``b % W`` = its slot's share."""
        info = get_worker_info()
        workers, worker = max(1, self.num_workers), (info.id if info is not None else 0)
        bs = self.batch_size
        batches, first = self.samples_per_rank // bs, self.start // bs
        lane = (first + worker) % workers  # the DataLoader takes batch `first` from worker 0, then 1, ...
        done, total = len(range(lane, first, workers)), len(range(lane, batches, workers))
        raw = islice(self.slot_samples(self.rank * workers + lane, self.world_size * workers), done * bs, None)
        for sample, img, label in islice(self.readable(raw), (total - done) * bs):
            seed = sample_seed(self.seed, self.epoch, _key_index(sample["__key__"], sample["__pass__"]))
            yield seeded_call(seed, self._item, img, label)

    def head(self, n: int, transform: Callable[[Image.Image], Any]) -> list[Any]:
        """``transform`` of the first ``n`` readable images of the first shard, in stored order (figures)."""
        samples = _webdataset().tariterators.tarfile_samples([{"url": self.urls[0]}])
        return [transform(img) for _, img, _ in islice(self.readable(iter(samples)), n)]


class ShardSamples(ImageFolderDataset):
    """Every sample of WebDataset shards once, in stored order, indexable like an image folder (``maelab embed``).

    The tars' member headers are listed once (Python's ``tarfile``; keys split by webdataset's own rule); an
    image is then read from its offset. ``samples[i] = ("SHARD:KEY", label)`` (the key as a relative path),
    labels from ``cls``, classes from ``index.json``; the skip/strict policy is the folders'.
    """

    def __init__(
        self,
        spec: str,
        transform: Callable[[Image.Image], Any] | None = None,
        channels: int = 3,
        strict: bool = False,
        target_size: int | None = None,
    ) -> None:
        urls, _, classes = resolve_shards(spec)
        self.root = Path(urls[0]).parent
        self.transform, self.channels, self.strict, self.target_size = transform, channels, strict, target_size
        self.num_skipped, self._bad = 0, set()
        self.classes, self.labeled = classes, bool(classes)
        self.samples: list[tuple[str, int]] = []
        self._where: list[tuple[str, int, int]] = []  # _where[i]: (shard, byte offset, size) of sample i's image
        for url in urls:
            self._list(url)
        self.targets = [t for _, t in self.samples]

    def _list(self, url: str) -> None:
        base_plus_ext = _webdataset().tariterators.base_plus_ext
        try:
            with tarfile.open(url) as tar:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is not None:
                        groups.setdefault(key, {})[ext.lower()] = m
                for key, fields in groups.items():
                    cls = tar.extractfile(fields["cls"]).read() if "cls" in fields else None  # type: ignore[union-attr]
                    image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
                    self.samples.append((f"{url}:{_path_of_key(key)}", int(cls) if cls is not None else -1))
                    self._where.append((url, image.offset_data, image.size) if image else (url, -1, 0))
        except (OSError, tarfile.TarError, ValueError) as e:
            raise DataError(f"cannot read shard {url}: {e}") from e

    def load(self, index: int) -> Image.Image:
        """Sample ``index``'s image ('RGB' or 'L'), no transform and no skipping; DataError if unreadable."""
        (url, offset, size), name = self._where[index], self.samples[index][0]
        if offset < 0:
            raise DataError(f"cannot read image {name}: no image field ({', '.join(IMAGE_FIELDS)}) in the sample")
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return load_image(data, channels=self.channels, target_size=self.target_size, name=name)


def build_stream_loader(
    stream: ShardStream, batch_size: int, num_workers: int, pin_memory: bool = False
) -> SignalSafeDataLoader:
    """DataLoader of full batches from ``stream``; workers are started per epoch (not persistent), so each
    epoch's workers see the epoch and start position :meth:`ShardStream.set_epoch` set."""
    stream.set_batching(batch_size, num_workers)
    return SignalSafeDataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        prefetch_factor=4 if num_workers > 0 else None,
    )
