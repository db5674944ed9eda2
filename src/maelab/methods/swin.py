"""SimMIM with a hierarchical encoder: a timm ``SwinTransformer`` (Xie et al. 2022, ``SwinTransformerForSimMIM``).

``mask from noise -> patch embed [B, h, w, C] -> hidden tokens := mask token -> Swin stages (each merging 2x2
tokens after the first) -> norm [B, h / s, w / s, C'] -> 1x1 conv to s*s*3 channels -> PixelShuffle(s) ->
[B, 3, H, W] -> L1 on the hidden pixels``, with ``s`` the encoder's total stride (``cfg.encoder_stride``: 32 for
the paper's four stages of 4 px patches).

As the official code: the mask lives on the patch-embedding grid (``cfg.grid_size``; mask units of 32 px are 8x8
patches of 4 px) and replaces the embeddings by ``x * (1 - w) + mask_token * w`` before the first stage; the
encoder is timm's Swin with timm's initialization (truncated normal .02, as SimMIM's); the mask token is
``trunc_normal_(std=.02)``; the head is a 1x1 ``Conv2d`` with PyTorch's default initialization followed by a
``PixelShuffle``. The prediction is returned patchified on the patch grid ([B, L, p*p*C]) so the loss, the figures
and the masking are those of the ViT variant (:class:`~maelab.methods.masked_encoder.MaskedEncoder`).

Swin has no class token and no absolute position embedding (timm's Swin, like SimMIM's default ``APE=False``);
``forward_features`` returns timm's [B, h', w', C'] map, which the evaluations average (``pool=avg``).
"""

from __future__ import annotations

from typing import cast

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.methods.masked_encoder import MaskedEncoder
from maelab.methods.options import MaskedEncoderOptions
from maelab.methods.vit import check_images
from maelab.models.patches import patchify


def build_swin_encoder(cfg: ModelConfig) -> SwinTransformer:
    """The timm Swin Transformer of ``cfg`` (no head), with timm's initialization. Gradient checkpointing follows
    ``cfg.grad_checkpointing``."""
    enc = cast(SwinTransformer, timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs()))
    grid = cast(tuple[int, int], enc.patch_embed.grid_size)
    if tuple(grid) != cfg.grid_size:  # pragma: no cover - defensive
        raise ValueError(f"timm grid {grid} != {cfg.grid_size}")
    enc.set_grad_checkpointing(cfg.grad_checkpointing)
    return enc


def swin_blocks(enc: SwinTransformer) -> list[nn.Module]:
    """Every block of every stage, in forward order."""
    return [blk for stage in enc.layers for blk in stage.blocks]  # type: ignore[union-attr]


class SwinMaskedEncoder(MaskedEncoder):
    """SimMIM on a timm Swin encoder (``self.encoder``): mask tokens at the patch embedding, conv + PixelShuffle
    head. Masking (mask units, ``draw_noise``) and the losses are :class:`MaskedEncoder`'s."""

    def __init__(self, cfg: ModelConfig, options: MaskedEncoderOptions) -> None:
        if cfg.encoder != "swin":
            raise ValueError(f"SwinMaskedEncoder needs model_args.encoder=swin, got {cfg.encoder!r}")
        if cfg.target != "pixels":
            raise ConfigError(
                f"invalid model_args.target={cfg.target!r}: the Swin head predicts pixels (1x1 conv + PixelShuffle); "
                "use target=pixels, or a ViT encoder for hog"
            )
        super().__init__(cfg, options)

    def _build_encoder(self) -> nn.Module:
        return build_swin_encoder(self.cfg)

    def _build_head(self) -> nn.Module:
        """SimMIM's decoder: ``Conv2d(C', s*s*in_chans, 1)`` + ``PixelShuffle(s)`` (PyTorch's default init)."""
        cfg, stride = self.cfg, self.cfg.encoder_stride
        return nn.Sequential(
            nn.Conv2d(cfg.num_features, stride**2 * cfg.in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )

    def _init_mask_token(self) -> None:
        """SimMIM's Swin init of the mask token: ``trunc_normal_(std=.02)`` (timm's default cut at +-2)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], mask [B, L] bool (L = the patch grid) -> latent [B, h', w', C'] (normed)."""
        enc = self.swin
        x = enc.patch_embed(imgs)  # [B, gh, gw, C] (timm's Swin is NHWC)
        w = mask.view(*x.shape[:3], 1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype).view(1, 1, 1, -1) * w
        return enc.norm(enc.layers(x))

    def predict(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, h', w', C'] -> pred [B, L, p*p*C]: the head's image [B, C, H, W] cut into the patch grid."""
        image = self.head(latent.permute(0, 3, 1, 2))
        return patchify(image, self.cfg.patch_size)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder output for the full image, no mask tokens: [B, h', w', C'] (timm's forward_features)."""
        check_images(self.cfg, imgs)
        return self.swin.forward_features(imgs)

    @property
    def swin(self) -> SwinTransformer:
        """``self.encoder`` as the timm Swin it is."""
        return cast(SwinTransformer, self.encoder)

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: every stage's."""
        return swin_blocks(self.swin)

    def no_weight_decay(self) -> set[str]:
        """The mask token: what SimMIM's pre-training exempts besides norms and biases (with
        ``weight_decay_tokens=false``). Its keyword list names ``encoder.relative_position_bias_table``, which no
        parameter name contains, so the relative position tables are decayed in pre-training (fine-tuning exempts
        them: timm's ``SwinTransformer.no_weight_decay``)."""
        return {"mask_token"}
