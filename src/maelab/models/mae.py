"""The masked autoencoder: a timm ViT encoder run on the visible patches, a light decoder.

Stages, as in the paper and facebookresearch/mae:
``patchify -> mask -> encode visible tokens (+ cls) -> decode with mask tokens -> masked MSE``.

Weight names are the official ones (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.*``, ``norm.*``, ``mask_token``, ``decoder_*``). Internally the encoder is the
timm module ``self.encoder``; the ``encoder.`` prefix is removed when saving and added when
loading, by two state-dict hooks registered in ``__init__`` (the only place that maps names).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, cast

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.models.masking import Masking, make_noise, masking_from_noise
from maelab.models.patches import patchify, unpatchify
from maelab.models.pos_embed import sincos_2d
from maelab.models.targets import TARGETS, masked_mse

ENCODER_PREFIX = "encoder."
TOP_LEVEL_KEYS = ("mask_token", "decoder_", "encoder_mask_token")
"""Parameters of the MAE itself (not of the timm encoder): their names get no ``encoder.`` prefix."""


class MAEOutput(NamedTuple):
    """loss: scalar; pred: [B, L, D] in target space (D = p*p*C for pixels); mask: [B, L] bool (True = hidden)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def encoder_tokens(enc: VisionTransformer) -> tuple[nn.Parameter, nn.Parameter]:
    """The encoder's cls token [1, 1, D] and position embedding [1, 1 + L, D].

    MAE's timm ViT always has both (timm types them Optional for ViTs built without)."""
    assert enc.cls_token is not None and enc.pos_embed is not None
    return enc.cls_token, enc.pos_embed


def decoder_blocks(cfg: ModelConfig) -> nn.ModuleList:
    """The MAE decoder's ``cfg.decoder_depth`` timm ViT blocks of width ``cfg.decoder_embed_dim``."""
    return nn.ModuleList(
        Block(
            cfg.decoder_embed_dim,
            cfg.decoder_num_heads,
            cfg.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]  # timm: any module factory
        )
        for _ in range(cfg.decoder_depth)
    )


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ``VisionTransformer`` encoder (``self.encoder``) and a ViT decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.encoder != "vit":
            raise ConfigError(
                f"invalid model_args.encoder={cfg.encoder!r}: MAE's encoder is a ViT (Swin: method=simmim)"
            )
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.grad_checkpointing = cfg.grad_checkpointing

        self.encoder = cast(VisionTransformer, timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs()))
        if tuple(self.encoder.patch_embed.grid_size) != self.grid_size:  # pragma: no cover - defensive
            raise ValueError(f"timm grid {self.encoder.patch_embed.grid_size} != {self.grid_size}")
        encoder_tokens(self.encoder)[1].requires_grad_(False)  # fixed sin-cos, as the paper

        d = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, d, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, d), requires_grad=False)
        self.decoder_blocks = decoder_blocks(cfg)
        self.decoder_norm = layer_norm(d)
        out_dim = TARGETS[cfg.target].dim(cfg.patch_size, cfg.in_chans)
        self.decoder_pred = nn.Linear(d, out_dim, bias=True)
        if cfg.mask_token_in_encoder:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
            self.mask_token.requires_grad_(False)  # unused: the decoder gets every position from the encoder

        self.initialize_weights()
        self._register_state_dict_hook(_drop_encoder_prefix)
        self._register_load_state_dict_pre_hook(_add_encoder_prefix)

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official init: sin-cos pos embeds, xavier-uniform linears and patch embed, N(0, .02) tokens."""
        cls_token, pos_embed = encoder_tokens(self.encoder)
        with torch.no_grad():
            pos_embed.copy_(sincos_2d(self.cfg.embed_dim, self.grid_size, cls_token=True)[None])
            self.decoder_pos_embed.copy_(sincos_2d(self.cfg.decoder_embed_dim, self.grid_size, cls_token=True)[None])
            w = self.encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
            if self.cfg.mask_token_in_encoder:
                nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    # ------------------------------------------------------------------ stages
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    def make_masking(
        self, batch_size: int, device: torch.device, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> Masking:
        """Masking from ``noise`` [B, L] if given, else from fresh noise of ``cfg.mask_type``."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None:
            noise = make_noise(self.cfg.mask_type, batch_size, self.grid_size, ratio, device)
        return masking_from_noise(noise, ratio)

    def _run_blocks(self, blocks: nn.ModuleList | nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], ids_keep [B, K] -> latent [B, 1 + K, D] (cls first, normed)."""
        enc = self.encoder
        cls_token, pos_embed = encoder_tokens(enc)
        x = enc.patch_embed(imgs)  # [B, L, D]
        x = x + pos_embed[:, 1:, :]
        x = gather_tokens(x, ids_keep)
        cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self._run_blocks(enc.blocks, x)
        return enc.norm(x)

    def forward_encoder_with_mask_tokens(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ablation encoder: all patches, masked ones replaced by a learned token.

        imgs [B, C, H, W], mask [B, L] bool -> latent [B, 1 + L, D] (cls first, normed)."""
        enc = self.encoder
        cls_token, pos_embed = encoder_tokens(enc)
        x = enc.patch_embed(imgs)  # [B, L, D]
        x = torch.where(mask.unsqueeze(-1), self.encoder_mask_token.to(x.dtype), x)
        x = x + pos_embed[:, 1:, :]
        cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(enc.blocks, torch.cat([cls, x], dim=1))
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + K, D], ids_restore [B, L] -> pred [B, L, p*p*C]."""
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] + 1 - n, d)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = gather_tokens(x_, ids_restore)  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> regression target [B, L, D] (D = p*p*C for pixels)."""
        return TARGETS[self.cfg.target].compute(imgs, self.patch_size, self.norm_pix_loss)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE against the (normalized) pixels."""
        return masked_mse(pred, self.target(imgs), mask)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """imgs [B, C, H, W]; noise [B, L] optional (same noise -> same mask as the official code)."""
        self._check_input(imgs)
        masking = self.make_masking(imgs.shape[0], imgs.device, mask_ratio, noise)
        if self.cfg.mask_token_in_encoder:
            latent = self.forward_encoder_with_mask_tokens(imgs, masking.mask)
            # every position is already present: the identity "unshuffle" adds no mask tokens
            ids = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
            pred = self.forward_decoder(latent, ids)
        else:
            latent = self.forward_encoder(imgs, masking.ids_keep)
            pred = self.forward_decoder(latent, masking.ids_restore)
        loss = self.forward_loss(imgs, pred, masking.mask)
        return MAEOutput(loss, pred, masking.mask)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder output for the full, unmasked image: [B, 1 + L, D] (timm's forward_features)."""
        self._check_input(imgs)
        return self.encoder.forward_features(imgs)

    def _check_input(self, imgs: torch.Tensor) -> None:
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or tuple(imgs.shape[-2:]) != self.img_hw:
            raise ValueError(
                f"expected images [B, {self.in_chans}, {self.img_hw[0]}, {self.img_hw[1]}], got {tuple(imgs.shape)}"
            )

    @property
    def img_hw(self) -> tuple[int, int]:
        s = self.cfg.img_size
        return s if isinstance(s, tuple) else (s, s)

    def draw_noise(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        rows: range | None = None,
    ) -> torch.Tensor:
        """Masking noise [batch_size, L] (or its ``rows``) for this model's ``mask_type`` and ``mask_ratio``."""
        return make_noise(self.cfg.mask_type, batch_size, self.grid_size, self.cfg.mask_ratio, device, generator, rows)

    @property
    def noise_on_cpu(self) -> bool:
        """Block masks are drawn on the CPU (rectangles, one sample at a time): their generator lives there."""
        return self.cfg.mask_type == "block"

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: the encoder's, then the decoder's."""
        return [*self.encoder.blocks, *self.decoder_blocks]

    # ------------------------------------------------------------------ parameter groups
    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters``) of tokens and position embeddings."""
        names = {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}
        return names | ({"encoder_mask_token"} if self.cfg.mask_token_in_encoder else set())

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's own key names (no decoder, no head)."""
        return {k: v for k, v in self.encoder.state_dict().items()}


def init_linear_and_norm(m: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights and zero biases, LayerNorm weight 1 and bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _is_top_level_key(name: str) -> bool:
    return name.startswith(TOP_LEVEL_KEYS)


def _drop_encoder_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: ``{prefix}encoder.X`` -> ``{prefix}X`` (official key names)."""
    inner = prefix + ENCODER_PREFIX
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith(prefix) and _is_top_level_key(k[len(prefix) :])]:
        state_dict[key] = state_dict.pop(key)  # official order: encoder keys first, then decoder


def _add_encoder_prefix(
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: official ``{prefix}X`` -> ``{prefix}encoder.X`` for encoder keys."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not _is_top_level_key(rest) and not rest.startswith(ENCODER_PREFIX):
            state_dict[prefix + ENCODER_PREFIX + rest] = state_dict.pop(key)
