"""Loading and exporting weights: official facebookresearch/mae checkpoints, exported encoders.

- ``load_official_checkpoint(path_or_state)``: an official ``mae_pretrain_vit_*.pth``
  (encoder only) or ``mae_visualize_vit_*.pth`` (full MAE) -> MaskedAutoencoder, strict
  key checking. The architecture is inferred from the tensor shapes.
- ``export_encoder(model, path)``: the encoder under timm's key names as safetensors, with
  the ``timm.create_model`` name and kwargs in the file's metadata.
- ``load_exported_encoder(path)``: rebuild that timm ViT.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from maelab.config import ModelConfig
from maelab.errors import CheckpointError, error_summary
from maelab.io import atomic_write
from maelab.models.mae import MaskedAutoencoder

_TIMM_BY_DIM = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the weights in a loaded checkpoint: ``{'model': sd}``, ``{'state_dict': sd}`` or sd itself."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_state_dict(obj[key], source)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
            return sd
    raise CheckpointError(f"{source}: no model weights found (expected a state dict or a dict with 'model')")


def infer_model_config(
    sd: dict[str, torch.Tensor], img_size: int | tuple[int, int] | None = None, **overrides: Any
) -> ModelConfig:
    """Architecture from official-layout tensor shapes (encoder-only or full MAE)."""
    try:
        proj = sd["patch_embed.proj.weight"]  # [D, C, p, p]
        pos = sd["pos_embed"]  # [1, 1 + L, D]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not an MAE/ViT checkpoint: missing key {e.args[0]!r}") from None
    embed_dim, in_chans, patch, _ = proj.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_ratio = mlp_hidden / embed_dim
    num_patches = pos.shape[1] - 1
    if img_size is None:
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise CheckpointError(f"cannot infer a non-square image size from {num_patches} patches: pass img_size")
        img_size = side * patch
    cfg: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=_default_heads(embed_dim),
        mlp_ratio=mlp_ratio,
        timm_name=_TIMM_BY_DIM.get(embed_dim, "vit_base_patch16_224"),
    )
    if "decoder_embed.weight" in sd:
        d = sd["decoder_embed.weight"].shape[0]
        cfg.update(
            decoder_embed_dim=d,
            decoder_num_heads=16 if d % 16 == 0 else _default_heads(d),
            decoder_depth=1
            + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder_blocks\.(\d+)\.", k))), default=-1),
        )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def _default_heads(dim: int) -> int:
    """Head count of the standard ViT of that width (64 dims per head)."""
    return {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}.get(dim, max(1, dim // 64))


def read_checkpoint(path: str | Path) -> Any:
    """torch.load on CPU with a clear error for missing or corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises several types for bad files
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{p}: corrupt or unreadable checkpoint ({error_summary(e)})") from e


def encoder_only_error(source: str | Path) -> CheckpointError:
    """The error for a decoder asked of a checkpoint that has none."""
    return CheckpointError(
        f"{source}: an encoder-only checkpoint (no decoder weights: the released "
        "mae_pretrain_vit_*.pth files, exported encoders and ViT directories have none); "
        "reconstructions and a full export need a full one (a maelab run, mae_visualize_vit_*.pth, "
        "a ViTMAE directory)"
    )


def load_official_checkpoint(
    path_or_state: str | Path | dict[str, Any],
    img_size: int | tuple[int, int] | None = None,
    source: str | None = None,
    need_decoder: bool = False,
    **overrides: Any,
) -> MaskedAutoencoder:
    """An official facebookresearch/mae checkpoint (or any state dict in its layout) -> MAE.

    Encoder-only files (``mae_pretrain_vit_*.pth``) load strictly into the encoder and leave
    the decoder freshly initialized; full files (``mae_visualize_vit_*.pth``) load strictly
    into the whole model. ``overrides`` set ModelConfig fields that shapes cannot tell, e.g.
    ``norm_pix_loss=True`` or ``decoder_num_heads``; ``source`` names a given state dict in errors.
    ``need_decoder``: refuse an encoder-only file (CheckpointError) instead of returning a model whose
    decoder is freshly initialized (reconstructions, a full Hugging Face export).
    """
    source = str(path_or_state) if not isinstance(path_or_state, dict) else source or "state dict"
    raw = read_checkpoint(path_or_state) if not isinstance(path_or_state, dict) else path_or_state
    sd = unwrap_state_dict(raw, source)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    cfg = infer_model_config(sd, img_size=img_size, **overrides)
    model = MaskedAutoencoder(cfg)
    full = any(k.startswith(("decoder_", "mask_token")) for k in sd)
    if need_decoder and not full:
        raise encoder_only_error(source)
    target = model if full else model.encoder
    try:
        result = target.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches: an incompatible checkpoint, not an internal bug
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"{source}: tensor shapes do not match the inferred model: {details}") from None
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: keys do not match the {'MAE' if full else 'encoder'} layout: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def export_encoder(model: MaskedAutoencoder, path: str | Path) -> Path:
    """Write the encoder as safetensors (timm key names) with its timm name/kwargs in metadata, atomically.

    Raises:
        CheckpointError: the file cannot be written (:func:`maelab.io.atomic_write`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.encoder_state_dict().items()}
    kwargs = model.cfg.timm_kwargs()
    meta = {
        "format": "pt",
        "maelab_timm_name": model.cfg.timm_name,
        "maelab_timm_kwargs": json.dumps(kwargs),
        "maelab_model_config": json.dumps(_jsonable(model.cfg)),
    }
    return atomic_write(path, save(tensors, metadata=meta), "the encoder", CheckpointError)


def _jsonable(cfg: ModelConfig) -> dict[str, Any]:
    from maelab.config import to_dict

    return to_dict(cfg)


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """(timm_name, timm_kwargs, model_config) stored by ``export_encoder``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if "maelab_timm_name" not in meta:
        raise CheckpointError(f"{path}: no maelab export metadata (was it written by `maelab export`?)")
    return {
        "timm_name": meta["maelab_timm_name"],
        "timm_kwargs": json.loads(meta["maelab_timm_kwargs"]),
        "model_config": json.loads(meta.get("maelab_model_config", "{}")),
    }


def load_exported_encoder(path: str | Path, **timm_overrides: Any) -> torch.nn.Module:
    """The timm model (a VisionTransformer, or a SwinTransformer for a Swin run) of an exported encoder, weights
    loaded strictly."""
    import timm
    from safetensors.torch import load_file

    meta = read_export_metadata(path)
    kwargs = {**meta["timm_kwargs"], **timm_overrides}
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    model = timm.create_model(meta["timm_name"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


# ---------------------------------------------------------------------------------- starting a run from weights
def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(sd, strict=True)``; on any difference one CheckpointError naming the first
    differing tensor (in the module's order, then the file's extra ones) and both shapes."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in sd:
            raise CheckpointError(
                f"{source}: tensor {key!r} (shape {tuple(value.shape)} in the model) is missing from the checkpoint"
            )
        if sd[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(sd[key].shape)} in the checkpoint "
                f"but {tuple(value.shape)} in the model"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(
            f"{source}: tensor {extra[0]!r} (shape {tuple(sd[extra[0]].shape)} in the checkpoint)"
            f" is not in the model" + (f", nor are {len(extra) - 1} more" if len(extra) > 1 else "")
        )
    module.load_state_dict(sd, strict=True)


def read_mae_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(official-layout state dict, the ModelConfig fields it records or {}) of a Hugging Face directory,
    a maelab run directory or ``.pt``, or an official ``.pth``."""
    from maelab.engine.checkpoint import resolve_checkpoint_path
    from maelab.models.hf import is_hf_dir, read_hf

    if is_hf_dir(source):
        return read_hf(source)
    p = resolve_checkpoint_path(source)
    raw = read_checkpoint(p)
    recorded = raw.get("model_config", {}) if isinstance(raw, dict) else {}
    return unwrap_state_dict(raw, str(p)), recorded


def init_from_mae(model: MaskedAutoencoder, source: str | Path) -> None:
    """``pretrain --init``: every weight of ``model``, decoder included, from ``source`` (see :func:`read_mae_weights`).

    Raises:
        CheckpointError: an encoder-only source, other head counts, or a tensor of another shape.
    """
    sd, recorded = read_mae_weights(source)
    if not any(k.startswith("decoder_") for k in sd):
        raise CheckpointError(
            f"{source}: no decoder weights (an encoder-only checkpoint): start the encoder from it with --init-encoder"
        )
    for name in ("num_heads", "decoder_num_heads"):
        if name in recorded and recorded[name] != getattr(model.cfg, name):
            raise CheckpointError(
                f"{source}: {name}={recorded[name]} in the checkpoint but "
                f"{getattr(model.cfg, name)} in the model (model_args.{name})"
            )
    load_strict(model, sd, str(source))


def init_from_timm(model: MaskedAutoencoder, path: str | Path) -> None:
    """``pretrain --init-encoder``: ``model.encoder`` from a timm ViT state dict (``.safetensors`` / ``.pth``),
    strictly except the classifier head."""
    sd = unwrap_state_dict(read_checkpoint(path), str(path))
    load_strict(model.encoder, {k: v for k, v in sd.items() if not k.startswith("head.")}, str(path))
