"""``maelab embed``: frozen features of every image of a folder, written to one file.

The features are those of every evaluation protocol (:mod:`.features`): the encoder's output
for the full image under the evaluation transform (resize, center crop, normalize), pooled
as the class token (``pool=cls``) or the mean of the patch tokens (``pool=avg``).

Outputs, for ``output = feats.safetensors`` (or ``feats.npy``):

- ``feats.safetensors``: tensor ``features`` float32 [N, D], plus ``labels`` int64 [N] when the
  folder is labeled (one subfolder per class); ``feats.npy`` holds only the features and the
  labels go to ``feats.labels.npy``;
- ``feats.files.txt``: the image of each row, one path per line, relative to the folder;
- ``feats.skipped.txt``: unreadable images (left out, no row), only when there were any.

Rows follow the folder's sorted scan order (:class:`~maelab.data.folders.ImageFolderDataset`),
whatever the batch size or the number of processes. An unreadable image never takes another
image's place: it is left out and listed, or, with ``data.strict`` (``--strict-data``), the run
stops naming it. Under ``torchrun`` each rank encodes its shard (:func:`~maelab.eval.common.shard`)
and rank 0 writes the gathered rows.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from maelab.config import batch_summary
from maelab.data.build import image_rows
from maelab.data.folders import ImageFolderDataset
from maelab.data.torchvision_sets import TORCHVISION_SETS
from maelab.engine.distributed import DistInfo, barrier, cpu_group
from maelab.errors import DataError
from maelab.eval.common import (
    checkpoint_source,
    dataset_len,
    frozen_encoder_setup,
    gather_interleaved_to_rank0,
    plain_loader,
    shard,
)
from maelab.eval.config import EmbedConfig
from maelab.eval.features import extract_features, feature_dim
from maelab.io import atomic_write

log = logging.getLogger(__name__)


class ReadableImages(Dataset):
    """``(transformed image, index)`` for each readable file of ``folder``, None for an unreadable one.

    The folder's skip/strict policy without its substitution (:meth:`ImageFolderDataset.try_read`):
    an unreadable file is counted and warned about (or, with ``strict``, raises
    :class:`~maelab.errors.DataError`), and :func:`collate_readable` drops it from the batch."""

    def __init__(self, folder: ImageFolderDataset) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        img = self.folder.try_read(index, self.folder.load)
        return None if img is None else (self.folder.apply_transform(img), index)


def collate_readable(batch: list[tuple[Any, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(imgs [b, C, H, W], indices [b])`` of the readable items; ``b = 0`` (empty tensors) when none is."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return default_collate(kept)


def image_folder(
    cfg: EmbedConfig, img_size: int | tuple[int, int], in_chans: int, transform: Any
) -> ImageFolderDataset:
    """The folder ``cfg.data.name`` as the evaluation protocols read it (same decode size, strict policy); a saved
    Hugging Face dataset (rows ``row<i>``) or WebDataset shards (``SHARD:KEY``, stored order) are read the same way.

    Raises:
        DataError: a built-in dataset name instead of a folder, a missing folder, no images."""
    name = cfg.data.name
    if name.lower() in ("synthetic", *TORCHVISION_SETS):
        raise DataError(
            f"maelab embed reads an image folder and lists its files; {name!r} is a built-in dataset: pass --data DIR"
        )
    return image_rows(cfg.data, img_size, in_chans, transform)  # a folder, a saved HF dataset or shards


def embed_rows(
    encoder: torch.nn.Module,
    items: ReadableImages,
    pool: str,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    dtype: torch.dtype,
    info: DistInfo,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Features of every item of ``items`` in dataset order, on rank 0's CPU (None on the other ranks).

    Each rank encodes its shard and moves it to the CPU; only rank 0 gathers the rows (through a gloo group under
    NCCL), so every other rank holds its own shard only.

    Returns:
        feats: float32 [N, D] (zero rows for unreadable files); readable: bool [N].
    """
    part = shard(items, info)
    loader = plain_loader(part, batch_size, num_workers, device, collate_fn=collate_readable)
    feats, index = extract_features(
        encoder, loader, pool, device, dtype, progress=progress and info.is_main, desc="embed"
    )
    # this rank's rows: dataset items rank, rank + W, ... (shard), unreadable ones left zero
    rows = ((index - info.rank) // info.world_size).cpu()
    local = torch.zeros(dataset_len(part), feature_dim(encoder))
    local[rows] = feats.cpu()
    del feats
    ok = torch.zeros(dataset_len(part), dtype=torch.long)
    ok[rows] = 1
    total, group = len(items), cpu_group() if info.enabled else None
    all_feats = gather_interleaved_to_rank0(local, total, info, group)
    all_ok = gather_interleaved_to_rank0(ok, total, info, group)
    if all_feats is None or all_ok is None:
        return None
    return all_feats, all_ok.bool()


def _write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically (:func:`maelab.io.atomic_write`); DataError when it cannot be written."""
    atomic_write(path, data, error=DataError)


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.cpu().numpy())
    return buf.getvalue()


def sidecar(output: Path, what: str) -> Path:
    """``feats.safetensors`` -> ``feats.<what>``, e.g. ``feats.files.txt``."""
    return output.with_name(f"{output.stem}.{what}")


def write_embeddings(
    output: Path,
    feats: torch.Tensor,
    labels: torch.Tensor | None,
    files: list[str],
    skipped: list[str],
    metadata: dict[str, str],
) -> None:
    """The features file and its lists (see the module docstring); stale lists of an earlier run are removed.

    feats [N, D] float32, labels [N] int64 or None, files: N paths, skipped: unreadable paths."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {"features": feats.cpu().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.cpu().contiguous()
        _write(output, save(tensors, metadata=metadata))
    else:
        _write(output, _npy(feats))
        if labels is not None:
            _write(sidecar(output, "labels.npy"), _npy(labels))
        else:
            sidecar(output, "labels.npy").unlink(missing_ok=True)
    _write(sidecar(output, "files.txt"), "".join(f"{f}\n" for f in files).encode())
    if skipped:
        _write(sidecar(output, "skipped.txt"), "".join(f"{f}\n" for f in skipped).encode())
    else:
        sidecar(output, "skipped.txt").unlink(missing_ok=True)


def embed(cfg: EmbedConfig, progress: bool = True) -> Path:
    """``maelab embed``: features of every image of the folder ``cfg.data.name``, written to ``cfg.output``.

    Returns the features file (rank 0 writes it; every rank returns its path).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from PIL import Image
        >>> import maelab
        >>> from maelab.eval import EmbedConfig, embed
        >>> from maelab.models.weights import export_encoder
        >>> tmp = Path(tempfile.mkdtemp())
        >>> for cls in ("cat", "dog"):
        ...     (tmp / "imgs" / cls).mkdir(parents=True)
        ...     for i in range(2):
        ...         Image.new("RGB", (40, 40), (100 * i, 50, 200)).save(tmp / "imgs" / cls / f"{i}.png")
        >>> ckpt = export_encoder(maelab.create_model("mae_vit_pico_patch4_32"), tmp / "encoder.safetensors")
        >>> cfg = EmbedConfig(checkpoint=str(ckpt), data={"name": str(tmp / "imgs"), "num_workers": 0},
        ...                   pool="avg", device="cpu", output=str(tmp / "feats.safetensors"))
        >>> path = embed(cfg, progress=False)
        >>> from safetensors.torch import load_file
        >>> out = load_file(path)
        >>> out["features"].shape, out["labels"].tolist()
        (torch.Size([4, 96]), [0, 0, 1, 1])
        >>> (tmp / "feats.files.txt").read_text().split()
        ['cat/0.png', 'cat/1.png', 'dog/0.png', 'dog/1.png']
    """
    info, device, dtype, mae, tf = frozen_encoder_setup(cfg)
    folder = image_folder(cfg, mae.cfg.img_size, mae.cfg.in_chans, tf)
    output = Path(str(cfg.output))
    if info.is_main:
        kind = "labeled" if folder.labeled else "unlabeled"
        log.info(
            f"embed ({cfg.pool} features) of {cfg.checkpoint} on {folder.root} ({len(folder)} images, {kind}); "
            f"{batch_summary(cfg.batch_size, None, info.world_size)}, {device}; output {output}"
        )
    encoder = mae.encoder.to(device)
    gathered = embed_rows(
        encoder,
        ReadableImages(folder),
        cfg.pool,
        device,
        batch_size=cfg.batch_size,
        num_workers=int(cfg.data.num_workers),
        dtype=dtype,
        info=info,
        progress=progress,
    )
    if gathered is not None:  # rank 0
        feats, keep = gathered
        paths = [os.path.relpath(path, folder.root) for path, _ in folder.samples]
        files = [p for p, good in zip(paths, keep.tolist()) if good]
        skipped = [p for p, good in zip(paths, keep.tolist()) if not good]
        if not files:
            raise DataError(f"no readable image in {folder.root}: all {len(paths)} files failed to load")
        labels = torch.tensor(folder.targets)[keep] if folder.labeled else None
        meta = {"pool": cfg.pool, "checkpoint": checkpoint_source(cfg), "data": str(folder.root.resolve())}
        write_embeddings(output, feats[keep], labels, files, skipped, meta)
        if skipped:
            log.warning(
                f"skipped {len(skipped)} unreadable image(s) of {len(paths)}: listed in "
                f"{sidecar(output, 'skipped.txt')}"
            )
    barrier(info)  # the files exist when any rank returns
    return output
