"""Encoder -> classifier: a timm ``VisionTransformer`` carrying the MAE encoder's weights.

As the official fine-tuning code: with global average pooling (default) the encoder's
final ``norm`` is dropped and a new ``fc_norm`` follows the pooling; with the class token
the pre-trained ``norm`` is kept. The new head is initialized ``trunc_normal(std=2e-5)``.
Weights load with strict key checking except exactly those expected differences.

Also here: partial fine-tuning (:func:`set_trainable_blocks`, paper Fig. 9) and the
layer-decay parameter groups (:func:`layer_decay_param_groups`: timm's implementation with the official layer ids).
"""

from __future__ import annotations

import re
from typing import Any, cast

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maelab.config import POOLS, ModelConfig
from maelab.errors import CheckpointError, ConfigError

HEAD_PREFIXES = ("head.", "fc_norm.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def classifier_kwargs(
    model_cfg: ModelConfig,
    num_classes: int,
    pool: str = "avg",
    drop_path: float = 0.0,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``timm.create_model(model_cfg.timm_name, **kwargs)`` arguments of the classifier."""
    kwargs = dict(model_cfg.timm_kwargs())
    kwargs.update(num_classes=num_classes, global_pool="avg" if pool == "avg" else "token", drop_path_rate=drop_path)
    if img_size is not None:
        kwargs["img_size"] = img_size
    return kwargs


def build_classifier(
    mae: Any | None,
    num_classes: int,
    *,
    model_cfg: ModelConfig | None = None,
    pool: str = "avg",
    drop_path: float = 0.1,
    img_size: int | tuple[int, int] | None = None,
    head_init_std: float = 2e-5,
    source: str = "checkpoint",
) -> VisionTransformer:
    """A timm ViT classifier with ``mae``'s encoder weights (``mae=None``: timm's random init).

    Args:
        mae: a MaskedAutoencoder (or None for a from-scratch baseline, then ``model_cfg`` is required).
        num_classes: classes of the new head.
        pool: 'avg' (global average + fc_norm, paper) or 'cls' (class token after norm).
        drop_path: stochastic depth rate.
        img_size: fine-tuning resolution (default: the encoder's); position embeddings are resampled.
        head_init_std: std of the head's truncated-normal init when loading pre-trained weights.
        source: name of the weights' origin, for error messages.

    Raises:
        CheckpointError: the encoder's weights do not fit the classifier (one line).
    """
    if mae is not None:
        model_cfg = mae.cfg
    if model_cfg is None:
        raise ValueError("build_classifier needs a MaskedAutoencoder or a model_cfg")
    if pool not in POOLS:
        raise ConfigError(f"invalid pool={pool!r}: one of {', '.join(POOLS)}")
    kwargs = classifier_kwargs(model_cfg, num_classes, pool, drop_path, img_size)
    model = cast(VisionTransformer, timm.create_model(model_cfg.timm_name, pretrained=False, **kwargs))
    if mae is not None:
        load_encoder_weights(model, mae.encoder_state_dict(), source=source)
        head = cast(nn.Linear, model.head)  # num_classes > 0
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=head_init_std)
            nn.init.zeros_(head.bias)
    return model


def load_encoder_weights(
    model: VisionTransformer, encoder_sd: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load timm-named encoder weights into a classifier ViT; only head/fc_norm (new) and
    ``norm`` (dropped with average pooling) may differ. Position embeddings are resampled
    to the classifier's grid if needed."""
    sd = dict(encoder_sd)
    uses_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    if uses_fc_norm:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    pos, own_pos = sd.get("pos_embed"), model.pos_embed
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape and pos.shape[-1] == own_pos.shape[-1]:
        sd["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens
        )
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{source}: encoder weights do not fit the classifier architecture "
            f"(checkpoint vs classifier shapes: {'; '.join(wrong[:3])})"
        )
    result = model.load_state_dict(sd, strict=False)
    expected_missing = {k for k in own if k.startswith(HEAD_PREFIXES)}
    missing = [k for k in result.missing_keys if k not in expected_missing]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: encoder weights do not match the classifier's keys: "
            f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )


# ---------------------------------------------------------------------------------- partial fine-tuning
def _check_blocks(vit: VisionTransformer, train_blocks: int) -> int:
    depth = len(vit.blocks)
    if train_blocks > depth:
        raise ConfigError(f"invalid train_blocks={train_blocks}: the encoder has only {depth} blocks")
    return depth


def is_trainable_name(name: str, depth: int, train_blocks: int | None) -> bool:
    """Whether parameter ``name`` of a ViT (classifier) is tuned when the last ``train_blocks`` blocks are."""
    if train_blocks is None or name.startswith(HEAD_PREFIXES):
        return True
    if train_blocks == 0:
        return False
    if name.startswith("norm."):
        return True
    m = _BLOCK.match(name)
    return m is not None and int(m.group(1)) >= depth - train_blocks


def set_trainable_blocks(vit: VisionTransformer, train_blocks: int | None) -> list[str]:
    """Partial fine-tuning (paper Fig. 9): tune only the last ``train_blocks`` blocks.

    Trainable: blocks ``depth-K .. depth-1``, the final ``norm`` (when K > 0), and the
    ``fc_norm`` / ``head`` if the model has them. Everything else (patch embedding, class
    token, position embedding, earlier blocks) gets ``requires_grad=False``. ``None``
    leaves every parameter as it is (full fine-tuning). Returns the trainable names.
    """
    if train_blocks is None:
        return [n for n, p in vit.named_parameters() if p.requires_grad]
    depth = _check_blocks(vit, train_blocks)
    names = []
    for name, p in vit.named_parameters():
        keep = is_trainable_name(name, depth, train_blocks)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def frozen_to_eval(vit: VisionTransformer, train_blocks: int | None) -> None:
    """Put the frozen part of a partially tuned ViT in eval mode (call after ``.train()``):
    frozen blocks then act as a fixed feature extractor (no drop path / dropout)."""
    if train_blocks is None:
        return
    depth = _check_blocks(vit, train_blocks)
    for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
        module = getattr(vit, name, None)
        if isinstance(module, nn.Module):
            module.eval()
    for blk in list(vit.blocks)[: depth - train_blocks]:
        blk.eval()
    if train_blocks == 0 and isinstance(getattr(vit, "norm", None), nn.Module):
        vit.norm.eval()


# ---------------------------------------------------------------------------------- optimizer groups
OFFICIAL_LAYERS = {"stem": r"^(?:cls_token|pos_embed|patch_embed)", "blocks": r"^blocks\.(\d+)\."}
"""Layer ids of the official ``util/lr_decay.py`` (after BEiT) as a timm group matcher: the tokens, position
embedding and patch embedding are layer 0, block i is layer i + 1, and everything else (the final ``norm``,
``fc_norm``, ``head``) is the last layer, L + 1. timm's own ViT matcher puts ``norm`` with the last block."""


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Layer-decay groups of the official fine-tuning code, built by timm's ``param_groups_layer_decay``.

    Block i of L gets ``lr_scale = layer_decay ** (L - i)``, the patch embedding / tokens
    ``layer_decay ** (L + 1)``, the final norm (``pool=cls``), fc_norm and head 1.0
    (:data:`OFFICIAL_LAYERS`). No weight decay for 1-D parameters (norms, biases) and
    ``model.no_weight_decay()`` (tokens, position embedding). Frozen parameters are left out.
    """
    from types import SimpleNamespace

    from timm.optim import param_groups_layer_decay

    no_weight_decay = getattr(model, "no_weight_decay", None)
    nwd = no_weight_decay() if callable(no_weight_decay) else set()
    # the model as timm sees it, with the official layer ids in place of timm's ViT matcher
    official = SimpleNamespace(
        named_parameters=model.named_parameters, group_matcher=lambda coarse=False: OFFICIAL_LAYERS
    )
    return param_groups_layer_decay(
        official,  # type: ignore[arg-type]  # duck-typed: timm reads only named_parameters and group_matcher
        weight_decay=weight_decay,
        no_weight_decay_list=nwd,
        layer_decay=layer_decay,
    )
