"""Hugging Face ``transformers`` ViTMAE / ViT directories <-> maelab.

- ``save_hf(model, dir, encoder_only=False)``: ``config.json`` + ``model.safetensors`` in the
  layout of the hub's ``facebook/vit-mae-*`` files, which ``ViTMAEForPreTraining.from_pretrained``
  loads (encoder-only: a ``vit`` directory for ``ViTModel`` / ``ViTMAEModel.from_pretrained``).
  Writing needs no ``transformers``.
- ``load_hf(dir)``: such a directory, or a hub snapshot on disk (``model.safetensors`` or
  ``pytorch_model.bin``, possibly sharded) -> :class:`MaskedAutoencoder`. Settings maelab
  cannot represent (``hidden_act``, ``qkv_bias``, dropout, ...) are refused in one line.

The key mapping is the one table ``_PLAIN`` / ``_STACKS`` / ``_BLOCK``: official (maelab) names
on the left, the hub's names on the right; the fused ``attn.qkv`` is split into query, key and
value along dim 0. State dicts of transformers 5.x modules (``layers.N.attention.q_proj``...)
are read too: ``_NEWER`` renames them to the hub names first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from maelab.errors import CheckpointError
from maelab.io import atomic_write, write_json

MAE_TYPE, VIT_TYPE = "vit_mae", "vit"
CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Weight files of a Hugging Face directory, in the order they are looked for (``*.index.json``: sharded)."""

_PLAIN = (
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
    ("norm", "vit.layernorm"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_embed", "decoder.decoder_embed"),
    ("decoder_norm", "decoder.decoder_norm"),
    ("decoder_pred", "decoder.decoder_pred"),
)
"""Official module/parameter name -> hub name (``ViTMAEForPreTraining``), outside the blocks."""
_STACKS = (("blocks", "vit.encoder.layer"), ("decoder_blocks", "decoder.decoder_layers"))
"""Official block list -> hub layer list."""
_BLOCK = (
    ("norm1", ("layernorm_before",)),
    ("attn.qkv", ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
    ("attn.proj", ("attention.output.dense",)),
    ("norm2", ("layernorm_after",)),
    ("mlp.fc1", ("intermediate.dense",)),
    ("mlp.fc2", ("output.dense",)),
)
"""Official name inside a block -> hub name(s) inside a layer (qkv: three, concatenated along dim 0)."""
_NEWER = (
    (r"^vit\.layers\.", "vit.encoder.layer."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
"""transformers 5.x module names (and its ``save_pretrained`` renaming of the decoder layers) -> hub names."""
_IGNORED = re.compile(r"^(vit\.pooler\.|classifier\.|vit\.embeddings\.mask_token$)")
"""Hub weights outside the MAE: ViTModel's pooler, a classifier head, ViT's optional mask token."""
_ENCODER_PREFIX = "vit."
"""The encoder's prefix in ``ViTMAEForPreTraining``; ``ViTModel`` / ``ViTMAEModel`` files have none."""


# ---------------------------------------------------------------------------------- key mapping
def hf_names(key: str) -> tuple[str, ...]:
    """Hub name(s) of one official key (three for a fused ``attn.qkv`` tensor)."""
    for ours, theirs in _PLAIN:
        if key == ours or key.startswith(ours + "."):
            return (theirs + key[len(ours) :],)
    for ours, theirs in _STACKS:
        if m := re.fullmatch(rf"{ours}\.(\d+)\.(.+)", key):
            for part, hf_parts in _BLOCK:
                if m.group(2).startswith(part + "."):
                    return tuple(f"{theirs}.{m.group(1)}.{p}{m.group(2)[len(part) :]}" for p in hf_parts)
    raise CheckpointError(f"weight {key!r} has no Hugging Face ViTMAE counterpart")


def official_name(hf_key: str) -> tuple[str, int, int] | None:
    """(official key, part index, number of parts) of one hub name; None if it is not an MAE weight."""
    for ours, theirs in _PLAIN:
        if hf_key == theirs or hf_key.startswith(theirs + "."):
            return ours + hf_key[len(theirs) :], 0, 1
    for ours, theirs in _STACKS:
        if m := re.fullmatch(rf"{re.escape(theirs)}\.(\d+)\.(.+)", hf_key):
            for part, hf_parts in _BLOCK:
                for j, p in enumerate(hf_parts):
                    if m.group(2).startswith(p + "."):
                        return f"{ours}.{m.group(1)}.{part}{m.group(2)[len(p) :]}", j, len(hf_parts)
    return None


def hub_name(key: str) -> str:
    """Any HF ViT / ViTMAE key (hub files, transformers 4.x or 5.x modules, with or without the
    ``vit.`` prefix) -> its hub name in ``ViTMAEForPreTraining``."""
    if not key.startswith((_ENCODER_PREFIX, "decoder.", "classifier.")):
        key = _ENCODER_PREFIX + key
    for pattern, repl in _NEWER:
        key = re.sub(pattern, repl, key)
    return key


def to_hf_state_dict(sd: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """Official state dict -> hub names (``ViTMAEForPreTraining``; ``encoder_only``: ``ViTModel`` keys,
    decoder dropped). qkv [3D, ...] is split into query, key, value [D, ...]; every tensor is its own copy."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        names = hf_names(key)
        if encoder_only:
            if not names[0].startswith(_ENCODER_PREFIX):
                continue
            names = tuple(n[len(_ENCODER_PREFIX) :] for n in names)
        for name, part in zip(names, value.detach().chunk(len(names), dim=0)):
            out[name] = part.to("cpu", copy=True).contiguous()
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """HF ViT / ViTMAE state dict (any layout :func:`hub_name` reads) -> official names; qkv re-fused.

    Raises:
        CheckpointError: a weight that is not part of a ViT / ViTMAE, or an incomplete query/key/value.
    """
    parts: dict[str, list[torch.Tensor | None]] = {}
    for key, value in hf_sd.items():
        name = hub_name(key)
        if _IGNORED.match(name):
            continue
        found = official_name(name)
        if found is None:
            raise CheckpointError(f"{source}: weight {key!r} is not part of a Hugging Face ViT / ViTMAE")
        ours, j, n = found
        parts.setdefault(ours, [None] * n)[j] = value
    whole: dict[str, list[torch.Tensor]] = {}
    for ours, chunks in parts.items():
        present = [c for c in chunks if c is not None]
        if len(present) < len(chunks):
            raise CheckpointError(f"{source}: {hf_names(ours)} are not all there (query, key and value)")
        whole[ours] = present
    return {k: torch.cat(c, dim=0) if len(c) > 1 else c[0] for k, c in whole.items()}


# ---------------------------------------------------------------------------------- config.json
def hf_config(cfg: Any, encoder_only: bool = False) -> dict[str, Any]:
    """``config.json`` of a :class:`~maelab.config.ModelConfig`: ``vit_mae`` (``ViTMAEForPreTraining``)
    or, ``encoder_only``, ``vit`` (``ViTModel``). LayerNorm eps 1e-6, exact GELU, qkv bias, no dropout."""
    size = cfg.img_size if isinstance(cfg.img_size, int) else list(cfg.img_size)
    if isinstance(size, list) and size[0] == size[1]:
        size = size[0]
    out: dict[str, Any] = dict(
        architectures=["ViTModel" if encoder_only else "ViTMAEForPreTraining"],
        model_type=VIT_TYPE if encoder_only else MAE_TYPE,
        image_size=size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    if not encoder_only:
        if isinstance(size, list):
            raise CheckpointError(
                f"Hugging Face ViTMAE takes square images only, the model has img_size={size}: "
                "export the encoder with --encoder-only (a ViT takes any size)"
            )
        out.update(
            decoder_hidden_size=cfg.decoder_embed_dim,
            decoder_num_hidden_layers=cfg.decoder_depth,
            decoder_num_attention_heads=cfg.decoder_num_heads,
            decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
            mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.norm_pix_loss,
        )
    return out


def model_config_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig fields of a Hugging Face ``config.json`` (missing entries: transformers' defaults).

    Raises:
        CheckpointError: one line naming the first setting maelab cannot represent.
    """
    mtype = config.get("model_type")
    if mtype not in (MAE_TYPE, VIT_TYPE):
        raise CheckpointError(
            f"{source}: model_type={mtype!r} in config.json; maelab reads "
            f"{MAE_TYPE!r} (ViTMAE) and {VIT_TYPE!r} (ViT) directories"
        )

    def refuse(name: str, why: str) -> None:
        raise CheckpointError(
            f"{source}: config.json has {name}={config.get(name)!r}, which maelab cannot represent ({why})"
        )

    if config.get("hidden_act", "gelu") != "gelu":
        refuse("hidden_act", "its ViT blocks use the exact GELU, 'gelu'")
    if config.get("qkv_bias", True) is not True:
        refuse("qkv_bias", "its attention has a qkv bias")
    if not 0 < config.get("layer_norm_eps", 1e-12) <= 1e-6:
        refuse(
            "layer_norm_eps",
            "its LayerNorms use eps=1e-6, the official value; values down to 1e-12, "
            "transformers' default in the facebook/vit-mae-* configs, give the same outputs",
        )
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if config.get(name, 0.0) != 0:
            refuse(name, "MAE pre-training uses no dropout")
    patch = config.get("patch_size", 16)
    if isinstance(patch, list):
        if len(set(patch)) != 1:
            refuse("patch_size", "patches are square")
        patch = patch[0]
    size = config.get("image_size", 224)
    if isinstance(size, list):
        size = size[0] if len(set(size)) == 1 else tuple(size)
    dim = config.get("hidden_size", 768)
    ratio = config.get("intermediate_size", 3072) / dim
    fields: dict[str, Any] = dict(
        img_size=size,
        patch_size=patch,
        in_chans=config.get("num_channels", 3),
        embed_dim=dim,
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        mlp_ratio=ratio,
    )
    if mtype == MAE_TYPE:
        ddim = config.get("decoder_hidden_size", 512)
        if config.get("decoder_intermediate_size", 2048) != int(ddim * ratio):
            refuse(
                "decoder_intermediate_size",
                f"its decoder MLP has the encoder's ratio {ratio:g}, "
                f"{int(ddim * ratio)} for decoder_hidden_size={ddim}",
            )
        fields.update(
            decoder_embed_dim=ddim,
            decoder_depth=config.get("decoder_num_hidden_layers", 8),
            decoder_num_heads=config.get("decoder_num_attention_heads", 16),
            mask_ratio=config.get("mask_ratio", 0.75),
            norm_pix_loss=bool(config.get("norm_pix_loss", False)),
        )
    return fields


# ---------------------------------------------------------------------------------- directories
def is_hf_dir(path: str | Path) -> bool:
    """True for a directory with a ``config.json`` (a ``save_pretrained`` output or a hub snapshot)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return obj


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (the first of :data:`WEIGHT_FILES` there), their keys as stored."""
    from maelab.models.weights import read_checkpoint, unwrap_state_dict

    d = Path(path)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            shards = (
                sorted(set(_read_json(d / name).get("weight_map", {}).values()))
                if name.endswith(".index.json")
                else [name]
            )
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(unwrap_state_dict(read_checkpoint(d / shard), str(d / shard)))
            return sd
    raise CheckpointError(f"{d}: no weights next to config.json (looked for {', '.join(WEIGHT_FILES)})")


def read_hf(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(official-layout state dict, ModelConfig fields) of a Hugging Face directory."""
    d = Path(path)
    fields = model_config_fields(_read_json(d / CONFIG_FILE), str(d))
    return from_hf_state_dict(read_hf_weights(d), str(d)), fields


def load_hf(path: str | Path, need_decoder: bool = False, **overrides: Any):  # -> MaskedAutoencoder
    """A Hugging Face ViTMAE (full MAE) or ViT / ViTMAEModel (encoder; the decoder stays freshly
    initialized, or ``need_decoder`` refuses it) directory -> :class:`MaskedAutoencoder`, every tensor
    checked strictly. ``overrides`` set ModelConfig fields (e.g. ``mask_type``)."""
    from maelab.models.weights import load_official_checkpoint

    sd, fields = read_hf(path)
    fields.update(overrides)
    return load_official_checkpoint(
        sd, img_size=fields.pop("img_size"), source=str(path), need_decoder=need_decoder, **fields
    )


def save_hf(model: Any, path: str | Path, encoder_only: bool = False) -> Path:
    """Write ``model`` (a MaskedAutoencoder) as a Hugging Face directory: ``config.json`` + ``model.safetensors``.

    Raises:
        CheckpointError: settings Hugging Face ViTMAE has no place for (the ``mask_token_in_encoder``
            ablation, the HOG target, non-square images), unless ``encoder_only``; or the weights cannot be
            written (a full disk, ...).
        MaelabError: ``config.json`` cannot be written.
    """
    from safetensors.torch import save

    cfg = model.cfg
    if not encoder_only and (cfg.mask_token_in_encoder or cfg.target != "pixels"):
        setting = "mask_token_in_encoder=True" if cfg.mask_token_in_encoder else f"target={cfg.target!r}"
        raise CheckpointError(
            f"Hugging Face ViTMAE has no {setting} (it encodes the visible patches and "
            "regresses pixels): export the encoder with --encoder-only"
        )
    config = hf_config(cfg, encoder_only)
    sd = model.encoder_state_dict() if encoder_only else model.state_dict()
    d = Path(path)
    atomic_write(
        d / WEIGHT_FILES[0],
        save(to_hf_state_dict(sd, encoder_only), metadata={"format": "pt"}),
        "the Hugging Face weights",
        CheckpointError,
    )
    write_json(config, d / CONFIG_FILE)
    return d
