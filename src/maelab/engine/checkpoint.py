"""Checkpoints: atomic writes, rotation, corrupt-file fallback, loading models from any source.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
over the target, so a crash mid-save never leaves a broken ``last.pt``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from maelab.config import ModelConfig, from_dict
from maelab.errors import CheckpointError, error_summary
from maelab.io import atomic_path, atomic_write, write_synced

log = logging.getLogger(__name__)

LAST = "last.pt"
_PERIODIC = re.compile(r"^(epoch|step)_(\d+)\.pt$")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` atomically (temp file + fsync + rename, :func:`maelab.io.atomic_write`).

    Raises:
        CheckpointError: the write failed (a full disk, a file-size limit, no permission, ...): the temporary
            file is removed and a previous file at ``path`` is left as it was, which the message says.
    """
    return atomic_write(path, lambda f: torch.save(obj, f), "checkpoint", CheckpointError)


def atomic_link(src: Path, dst: Path) -> Path:
    """Give the written file ``src`` a second name ``dst``, atomically and without serializing again:
    a hard link (a flushed copy where the filesystem has none) under a temporary name, renamed over
    ``dst``. Deleting either name later (rotation) leaves the other's data intact.

    Raises:
        CheckpointError: the copy failed (a full disk, ...); a previous ``dst`` is left as it was."""
    with atomic_path(dst, "checkpoint", CheckpointError) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FAT filesystems)
            with open(src, "rb") as fin:
                write_synced(tmp, lambda fout: shutil.copyfileobj(fin, fout))
    # if dst already was a name of src, the rename left tmp, which atomic_path removed
    return dst


def periodic_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``epoch_N.pt`` / ``step_N.pt`` files, oldest first (by the step recorded in the name order)."""
    if not ckpt_dir.is_dir():
        return []
    files = [p for p in ckpt_dir.iterdir() if _PERIODIC.match(p.name)]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns)


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` periodic checkpoints (``last.pt`` is kept)."""
    files = periodic_checkpoints(ckpt_dir)
    for old in files[: max(len(files) - keep_last, 0)]:
        old.unlink(missing_ok=True)


def _try_load(path: Path) -> dict[str, Any] | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, ...
        log.warning("checkpoint %s is corrupt or unreadable (%s)", path, error_summary(e))
        return None
    if not isinstance(obj, dict) or "model" not in obj:
        log.warning("checkpoint %s has no model weights", path)
        return None
    return obj


def load_resume_state(ckpt_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """Newest readable training checkpoint: ``last.pt``, else the newest good periodic one."""
    d = Path(ckpt_dir)
    candidates = [d / LAST] if (d / LAST).exists() else []
    candidates += list(reversed(periodic_checkpoints(d)))
    for path in candidates:
        state = _try_load(path)
        if state is not None and "step" in state:
            if path.name != LAST and (d / LAST).exists():
                log.warning("resuming from %s because %s is unreadable", path, d / LAST)
            return state, path
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {d}: all of {[p.name for p in candidates]} are corrupt")
    raise CheckpointError(f"nothing to resume: no checkpoint in {d}")


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between two model-config dicts, as 'name: saved -> current'."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory -> its ``checkpoints/last.pt`` (or newest good one); a file -> itself."""
    p = Path(path)
    if p.is_dir():
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        _, found = load_resume_state(ckpt_dir)
        return found
    if not p.exists():
        raise CheckpointError(
            f"checkpoint not found: {p} (give a run directory, a Hugging Face directory "
            "or a .pt/.pth/.safetensors file)"
        )
    return p


def load_pretrained(path: str | Path, need_decoder: bool = False, **overrides: Any):  # -> MaskedAutoencoder
    """A MaskedAutoencoder (or another method's model: ``.cfg`` and ``.encoder`` alike) from a run dir, a maelab
    checkpoint, an official MAE ``.pth``, a Hugging
    Face ViTMAE / ViT directory (``save_pretrained`` output or hub snapshot), or an encoder exported
    by ``maelab export`` (for encoder-only sources the decoder stays freshly initialized)."""
    return load_pretrained_with_config(path, need_decoder, **overrides)[0]


def load_pretrained_with_config(
    path: str | Path, need_decoder: bool = False, **overrides: Any
) -> tuple[Any, dict[str, Any] | None]:
    """``load_pretrained`` plus the pre-training run's config dict (None for other sources).

    ``need_decoder``: refuse (CheckpointError) a source without decoder weights instead of returning a model
    whose decoder is freshly initialized (reconstructions, a full Hugging Face export)."""
    from maelab.models.hf import is_hf_dir, load_hf
    from maelab.models.mae import MaskedAutoencoder
    from maelab.models.weights import (
        encoder_only_error,
        load_official_checkpoint,
        read_checkpoint,
        read_export_metadata,
    )

    if is_hf_dir(path):
        return load_hf(path, need_decoder=need_decoder, **overrides), None
    p = resolve_checkpoint_path(path)
    if p.suffix == ".safetensors":
        if need_decoder:
            raise encoder_only_error(p)
        meta = read_export_metadata(p)
        cfg = from_dict(ModelConfig, {**meta["model_config"], **overrides})
        from safetensors.torch import load_file

        from maelab.methods.vit import PretrainedEncoder

        model = MaskedAutoencoder(cfg) if cfg.encoder == "vit" else PretrainedEncoder(cfg)
        model.encoder.load_state_dict(load_file(str(p)), strict=True)
        return model, None
    raw = read_checkpoint(p)
    if isinstance(raw, dict) and raw.get("kind") in ("finetune", "linprobe"):
        raise CheckpointError(
            f"{p}: a {raw['kind']} checkpoint (a classifier), not a pre-trained MAE; "
            "pass the pre-training run or file it started from"
        )
    if isinstance(raw, dict) and "model_config" in raw:
        from maelab.methods import get_method, method_options

        cfg = from_dict(ModelConfig, {**raw["model_config"], **overrides})
        method = get_method(raw.get("method", "mae"))  # pre-training checkpoints before the registry: MAE
        if method.name != "mae" and not need_decoder:  # evaluation and export need the encoder only
            from maelab.methods.vit import PretrainedEncoder

            encoder = PretrainedEncoder(cfg)
            weights = {k[len("encoder.") :]: v for k, v in raw["model"].items() if k.startswith("encoder.")}
            try:
                encoder.encoder.load_state_dict(weights, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{p}: encoder weights do not match its recorded architecture ({e})") from e
            return encoder, raw.get("config")
        trained = method.build(cfg, method_options(method, raw.get("method_args")))
        try:
            trained.load_state_dict(raw["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{p}: weights do not match its recorded architecture ({e})") from e
        return trained, raw.get("config")
    return load_official_checkpoint(raw, source=str(p), need_decoder=need_decoder, **overrides), None
