"""Pieces the non-MAE methods share: their timm ViT encoder (built and initialized as MAE's), the token
embedding with optional mask tokens, the block runner, the regression target and the input check.

The encoder is the timm ``VisionTransformer`` of ``cfg.timm_name`` with ``cfg.timm_kwargs()`` (no head), with
MAE's fixed 2-D sin-cos position embedding and MAE's initialization, so fine-tuning, probing, kNN, embed and
export read it exactly as an MAE encoder.
"""

from __future__ import annotations

from typing import cast

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from maelab.config import ModelConfig
from maelab.models.mae import encoder_tokens, init_linear_and_norm
from maelab.models.pos_embed import sincos_2d
from maelab.models.targets import TARGETS


def build_encoder(cfg: ModelConfig) -> VisionTransformer:
    """The timm ViT of ``cfg`` (no head) with a fixed sin-cos position embedding and MAE's init: xavier-uniform
    patch embedding and linears, N(0, .02) cls token, unit LayerNorms."""
    if cfg.encoder != "vit":
        raise ValueError(f"build_encoder builds ViTs; model_args.encoder={cfg.encoder!r} (see build_any_encoder)")
    enc = cast(VisionTransformer, timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs()))
    if tuple(enc.patch_embed.grid_size) != cfg.grid_size:  # pragma: no cover - defensive
        raise ValueError(f"timm grid {enc.patch_embed.grid_size} != {cfg.grid_size}")
    cls_token, pos_embed = encoder_tokens(enc)
    pos_embed.requires_grad_(False)
    with torch.no_grad():
        pos_embed.copy_(sincos_2d(cfg.embed_dim, cfg.grid_size, cls_token=True)[None])
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(cls_token, std=0.02)
    enc.apply(init_linear_and_norm)
    return enc


def build_any_encoder(cfg: ModelConfig) -> nn.Module:
    """The timm encoder of ``cfg``'s family: :func:`build_encoder` (ViT) or a Swin Transformer
    (:func:`maelab.methods.swin.build_swin_encoder`)."""
    if cfg.encoder == "swin":
        from maelab.methods.swin import build_swin_encoder

        return build_swin_encoder(cfg)
    return build_encoder(cfg)


class PretrainedEncoder(nn.Module):
    """The encoder of a method's pre-trained run without its head or decoder (what evaluation and export use):
    ``cfg`` and ``encoder`` (a ViT or a Swin) as on the method's model. Loading it needs nothing else the method
    had (e.g. BEiT's tokenizer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_any_encoder(cfg)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + L, D] (ViT) or [B, h', w', D] (Swin)."""
        return cast(VisionTransformer | SwinTransformer, self.encoder).forward_features(imgs)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's own key names (what ``maelab export`` writes)."""
        return dict(self.encoder.state_dict())


def embed_tokens(
    enc: VisionTransformer,
    imgs: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """imgs [B, C, H, W] -> the blocks' input [B, 1 + L, D]: patch embeddings, those where ``mask`` [B, L] is
    True replaced by ``mask_token`` [1, 1, D] (before the position embedding, as SimMIM and MaskFeat), plus the
    position embedding, the cls token first."""
    cls_token, pos_embed = encoder_tokens(enc)
    x = enc.patch_embed(imgs)  # [B, L, D]
    if mask is not None and mask_token is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = x + pos_embed[:, 1:, :]
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def run_blocks(blocks: nn.ModuleList | nn.Sequential, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """x [B, N, D] through ``blocks``; with ``grad_checkpointing`` (and gradients on) each block recomputes its
    activations in backward."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def target_dim(cfg: ModelConfig) -> int:
    """Length D of one patch's regression target (p*p*C for pixels, the HOG vector's length for hog)."""
    return TARGETS[cfg.target].dim(cfg.patch_size, cfg.in_chans)


def regression_target(cfg: ModelConfig, imgs: torch.Tensor) -> torch.Tensor:
    """imgs [B, C, H, W] -> [B, L, D]: ``cfg.target`` (:data:`maelab.models.targets.TARGETS`): the patch pixels
    (per-patch normalized with ``cfg.norm_pix_loss``, layout of :func:`maelab.models.patches.patchify`) or their
    HOG features."""
    return TARGETS[cfg.target].compute(imgs, cfg.patch_size, cfg.norm_pix_loss)


def image_hw(cfg: ModelConfig) -> tuple[int, int]:
    """(height, width) of the model's input."""
    s = cfg.img_size
    return s if isinstance(s, tuple) else (s, s)


def check_images(cfg: ModelConfig, imgs: torch.Tensor) -> None:
    """ValueError unless ``imgs`` is [B, in_chans, H, W] at the model's size."""
    h, w = image_hw(cfg)
    if imgs.dim() != 4 or imgs.shape[1] != cfg.in_chans or tuple(imgs.shape[-2:]) != (h, w):
        raise ValueError(f"expected images [B, {cfg.in_chans}, {h}, {w}], got {tuple(imgs.shape)}")
