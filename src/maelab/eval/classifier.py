"""Encoder -> classifier: a timm ``VisionTransformer`` (or, for a Swin encoder, ``SwinTransformer``) carrying the
pre-trained encoder's weights.

As the official fine-tuning code: with global average pooling (default) the encoder's
final ``norm`` is dropped and a new ``fc_norm`` follows the pooling; with the class token
the pre-trained ``norm`` is kept. The new head is initialized ``trunc_normal(std=2e-5)``.
Weights load with strict key checking except exactly those expected differences.

Also here: partial fine-tuning (:func:`set_trainable_blocks`, paper Fig. 9) and the
layer-decay parameter groups (:func:`layer_decay_param_groups`: timm's implementation with the official layer ids
for a ViT, timm's own grouping for a Swin). A Swin has no class token: it pools by average (``pool=avg``), after
its own final ``norm``.
"""

from __future__ import annotations

import re
from typing import Any, cast

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maelab.config import POOLS, ModelConfig
from maelab.errors import CheckpointError, ConfigError

HEAD_PREFIXES = ("head.", "fc_norm.")
_SWIN_MERGING = re.compile(r"^layers\.(\d+)\.downsample(?:\.|$)")
Classifier = VisionTransformer | SwinTransformer
"""The classifier of a ViT or a Swin encoder (timm models)."""


def classifier_kwargs(
    model_cfg: ModelConfig,
    num_classes: int,
    pool: str = "avg",
    drop_path: float = 0.0,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``timm.create_model(model_cfg.timm_name, **kwargs)`` arguments of the classifier (a Swin pools by average
    only: ``pool=cls`` is a one-line ConfigError)."""
    from maelab.eval.features import check_pool

    check_pool(pool, has_class_token=model_cfg.has_class_token)
    kwargs = dict(model_cfg.timm_kwargs())
    kwargs.update(num_classes=num_classes, global_pool="avg" if pool == "avg" else "token", drop_path_rate=drop_path)
    if img_size is not None:
        kwargs["img_size"] = img_size
        if model_cfg.encoder == "swin":
            kwargs["window_size"] = scaled_window(model_cfg, img_size)
    return kwargs


def scaled_window(model_cfg: ModelConfig, img_size: int | tuple[int, int]) -> int | tuple[int, int]:
    """A Swin's window at another input size: scaled with the patch grid along each side when that gives whole
    numbers (timm's ``set_input_size`` rule; SimMIM's 192 px window 6 -> 224 px window 7), else the
    pre-training's."""
    new = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    old = tuple(g * model_cfg.patch_size for g in model_cfg.grid_size)
    window = model_cfg.window_size
    if any((window * n) % o for n, o in zip(new, old)):
        return window
    h, w = (window * n // o for n, o in zip(new, old))
    return h if h == w else (h, w)


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
) -> Classifier:
    """A timm ViT (or Swin) classifier with ``mae``'s encoder weights (``mae=None``: timm's random init).

    Args:
        mae: a pre-trained model with ``cfg`` and ``encoder_state_dict()`` (a MaskedAutoencoder, another method's
            model or its :class:`~maelab.methods.vit.PretrainedEncoder`), or None for a from-scratch baseline
            (then ``model_cfg`` is required).
        num_classes: classes of the new head.
        pool: 'avg' (global average + fc_norm, paper) or 'cls' (class token after norm).
        drop_path: stochastic depth rate.
        img_size: fine-tuning resolution (default: the encoder's); position embeddings are resampled.
        head_init_std: std of the head's truncated-normal init when loading pre-trained ViT weights (MAE's 2e-5; a
            Swin's head keeps timm's truncated normal of std .02, SimMIM's).
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
    model = cast(Classifier, timm.create_model(model_cfg.timm_name, pretrained=False, **kwargs))
    if mae is not None:
        load_encoder_weights(model, mae.encoder_state_dict(), source=source)
    if mae is not None and model_cfg.encoder == "vit":  # a Swin's head keeps timm's init: SimMIM's, N(0, .02)
        head = cast(nn.Linear, model.get_classifier())  # num_classes > 0
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=head_init_std)
            nn.init.zeros_(head.bias)
    return model


def load_encoder_weights(model: Classifier, encoder_sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load timm-named encoder weights into a classifier (ViT or Swin); only head/fc_norm (new) and ``norm``
    (dropped by a ViT with average pooling) may differ. A ViT's position embeddings are resampled to the
    classifier's grid if needed (a Swin's relative position tables depend on its window only)."""
    sd = dict(encoder_sd)
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    if isinstance(model, SwinTransformer):  # another window: timm interpolates the relative position tables
        from timm.models.swin_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)
    pos, own_pos = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape and pos.shape[-1] == own_pos.shape[-1]:
        vit = cast(VisionTransformer, model)
        sd["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=vit.num_prefix_tokens
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
def block_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the transformer blocks in forward order: ``blocks.i.`` (ViT) or
    ``layers.s.blocks.j.`` (Swin, every stage's blocks in a row)."""
    if isinstance(model, SwinTransformer):
        return [
            f"layers.{s}.blocks.{j}."
            for s, stage in enumerate(model.layers)
            for j in range(len(cast(nn.Sequential, stage.blocks)))
        ]
    blocks: nn.Module = model.blocks  # type: ignore[assignment]  # a ViT's nn.Sequential
    return [f"blocks.{i}." for i in range(len(cast(nn.Sequential, blocks)))]


def _check_blocks(model: nn.Module, train_blocks: int) -> list[str]:
    prefixes = block_prefixes(model)
    if not 0 <= train_blocks <= len(prefixes):
        raise ConfigError(
            f"invalid train_blocks={train_blocks}: the encoder has only {len(prefixes)} blocks (0 to {len(prefixes)})"
        )
    return prefixes


def _is_tuned(name: str, prefixes: list[str], train_blocks: int) -> bool:
    """Whether parameter or module ``name`` is tuned when the last ``train_blocks`` blocks are: those blocks, the
    final ``norm`` (when any block is), the head, and a Swin patch merging between two tuned blocks."""
    if name.startswith(HEAD_PREFIXES) or name in ("head", "fc_norm"):
        return True
    if train_blocks == 0:
        return False
    if name == "norm" or name.startswith("norm."):
        return True
    cut = len(prefixes) - train_blocks  # blocks cut .. end are tuned
    for i, prefix in enumerate(prefixes):
        if name.startswith(prefix) or name + "." == prefix:
            return i >= cut
    merging = _SWIN_MERGING.match(name)
    if merging is not None:  # before its stage's first block: tuned when the block before it is
        first = prefixes.index(f"layers.{merging.group(1)}.blocks.0.")
        return first - 1 >= cut
    return False


def set_trainable_blocks(model: nn.Module, train_blocks: int | None) -> list[str]:
    """Partial fine-tuning (paper Fig. 9): tune only the last ``train_blocks`` blocks of a ViT or Swin classifier.

    Trainable: the last K blocks (:func:`block_prefixes` order), the final ``norm`` (when K > 0), a Swin patch
    merging that sits between two of them, and the ``fc_norm`` / ``head``. Everything else (patch embedding,
    class token, position embedding, earlier blocks) gets ``requires_grad=False``. ``None`` leaves every parameter
    as it is (full fine-tuning). Returns the trainable names.
    """
    if train_blocks is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    prefixes = _check_blocks(model, train_blocks)
    names = []
    for name, p in model.named_parameters():
        keep = _is_tuned(name, prefixes, train_blocks)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def frozen_to_eval(model: nn.Module, train_blocks: int | None) -> None:
    """Put the frozen part of a partially tuned encoder in eval mode (call after ``.train()``): frozen blocks then
    act as a fixed feature extractor (no drop path / dropout)."""
    if train_blocks is None:
        return
    prefixes = _check_blocks(model, train_blocks)
    for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            module.eval()
    for name, module in model.named_modules():
        is_unit = name + "." in prefixes or _SWIN_MERGING.fullmatch(name) is not None
        if is_unit and not _is_tuned(name, prefixes, train_blocks):
            module.eval()
    norm = getattr(model, "norm", None)
    if train_blocks == 0 and isinstance(norm, nn.Module):
        norm.eval()


# ---------------------------------------------------------------------------------- optimizer groups
OFFICIAL_LAYERS = {"stem": r"^(?:cls_token|pos_embed|patch_embed)", "blocks": r"^blocks\.(\d+)\."}
"""Layer ids of the official ``util/lr_decay.py`` (after BEiT) as a timm group matcher: the tokens, position
embedding and patch embedding are layer 0, block i is layer i + 1, and everything else (the final ``norm``,
``fc_norm``, ``head``) is the last layer, L + 1. timm's own ViT matcher puts ``norm`` with the last block."""


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Layer-decay groups of the official fine-tuning code, built by timm's ``param_groups_layer_decay``.

    ViT: block i of L gets ``lr_scale = layer_decay ** (L - i)``, the patch embedding / tokens
    ``layer_decay ** (L + 1)``, the final norm (``pool=cls``), fc_norm and head 1.0
    (:data:`OFFICIAL_LAYERS`). Swin: timm's own grouping (``SwinTransformer.group_matcher``: the patch embedding
    first, then every block of every stage in order, a stage's patch merging with its first block, the final
    norm with the last block, the head last; SimMIM's code puts the merging with the previous stage's last
    block instead). No weight decay for 1-D parameters (norms, biases) and ``model.no_weight_decay()`` (tokens,
    position embedding; Swin's relative position bias tables). Frozen parameters are left out.
    """
    from types import SimpleNamespace

    from timm.optim import param_groups_layer_decay

    no_weight_decay = getattr(model, "no_weight_decay", None)
    nwd = no_weight_decay() if callable(no_weight_decay) else set()
    if isinstance(model, SwinTransformer):
        return param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=nwd, layer_decay=layer_decay
        )
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
