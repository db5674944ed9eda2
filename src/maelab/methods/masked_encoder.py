"""A ViT that sees every patch, the hidden ones replaced by a learned mask token, and a linear head per patch:
SimMIM (Xie et al. 2022, microsoft/SimMIM) and MaskFeat (Wei et al. 2022, facebookresearch/SlowFast).

``mask from noise -> patch embed, hidden tokens := mask token -> + position embedding, cls first -> ViT blocks,
norm -> Linear per patch token -> loss on the hidden patches``.

As in ``VisionTransformerForSimMIM`` and MaskFeat's ``_maskfeat_forward`` the mask token replaces the patch
embedding before the position embedding is added. SimMIM's head, a 1x1 convolution to ``p*p*3`` channels and a
``PixelShuffle(p)``, is a Linear from each patch token to its ``p*p*C`` pixels; here it writes them in
:func:`~maelab.models.patches.patchify`'s layout. Deviations from the official models, so that the encoder is the
same timm ViT as MAE's: a fixed sin-cos position embedding (SimMIM's ViT-B uses relative position biases,
MaskFeat a learned one) and MAE's weight initialization.

Losses (``options.loss``), over the hidden patches only:

- ``l1`` (SimMIM): ``sum |pred - target| / (hidden pixels + 1e-5) / C``, i.e. SimMIM's
  ``(l1 * mask).sum() / (mask.sum() + 1e-5) / in_chans`` with the mask upsampled to pixels (for HOG targets the
  "pixels" of a patch are its ``D / C`` values per channel);
- ``mse`` (MaskFeat): the mean over hidden patches of the per-patch MSE (:func:`maelab.models.targets.masked_mse`).

Masking: with ``options.mask_unit`` the image is cut into square units of that many pixels and exactly
``ceil(units * mask_ratio)`` of them are hidden per image (SimMIM's ``MaskGenerator``); without, the patches
are masked by the model's ``mask_type`` (random, block, grid) exactly as MAE masks them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.methods.options import MaskedEncoderOptions, option_error
from maelab.methods.vit import (
    build_encoder,
    check_images,
    embed_tokens,
    image_hw,
    init_linear_and_norm,
    regression_target,
    run_blocks,
    target_dim,
)
from maelab.models.masking import make_noise, num_kept
from maelab.models.targets import masked_mse

AUTO_MASK_UNIT = 32
"""SimMIM's mask unit in pixels (``DATA.MASK_PATCH_SIZE``): 6 x 6 units at 192 px, 7 x 7 at 224 px."""
MIN_UNITS_PER_SIDE = 4
"""``mask_unit="auto"`` keeps at least this many units along the shorter side of the image."""
L1_EPS = 1e-5
"""SimMIM's ``mask.sum() + 1e-5``."""


class MaskedEncoderOutput(NamedTuple):
    """loss: scalar; pred: [B, L, D] in target space (D = p*p*C for pixels); mask: [B, L] bool (True = hidden)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def resolve_mask_unit(mask_unit: int | str | None, cfg: ModelConfig) -> int | None:
    """The mask unit's side in pixels for ``cfg``'s image and patch size (None: per-patch masking).

    ``"auto"``: the largest multiple of the patch size up to 32 px that divides the image into at least 4 units a
    side (32 px at 192 or 224 px, 8 px for 32 px images with 4 px patches; the patch itself if none does). An
    int must be a multiple of the patch size that divides the image (a one-line ConfigError otherwise)."""
    if mask_unit is None:
        return None
    p = cfg.patch_size
    h, w = image_hw(cfg)
    if mask_unit == "auto":
        fits = [u for u in range(p, AUTO_MASK_UNIT + 1, p) if h % u == 0 and w % u == 0]
        fits = [u for u in fits if min(h, w) // u >= MIN_UNITS_PER_SIDE]
        return max(fits, default=p)
    assert isinstance(mask_unit, int)
    if mask_unit % p or h % mask_unit or w % mask_unit:
        raise option_error(
            "mask_unit", mask_unit, f"must be a multiple of patch_size={p} that divides the {h}x{w} image"
        )
    return mask_unit


class MaskedEncoder(nn.Module):
    """A timm ViT encoder (``self.encoder``) on all patches with mask tokens, and a linear per-patch head."""

    def __init__(self, cfg: ModelConfig, options: MaskedEncoderOptions) -> None:
        super().__init__()
        self.cfg = cfg
        self.options = options
        self.mask_unit = resolve_mask_unit(options.mask_unit, cfg)
        if self.mask_unit is not None and cfg.mask_type != "random":
            raise ConfigError(
                f"invalid method_args.mask_unit={options.mask_unit!r}: mask units are masked at random; "
                f"model_args.mask_type={cfg.mask_type!r} needs method_args.mask_unit=null"
            )
        self.num_masked = self._count_masked()
        self.encoder = self._build_encoder()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.head = self._build_head()
        self._init_mask_token()

    def _build_encoder(self) -> nn.Module:
        """The timm ViT of ``cfg`` (:func:`~maelab.methods.vit.build_encoder`)."""
        return build_encoder(self.cfg)

    def _build_head(self) -> nn.Module:
        """The prediction head: a Linear from each patch token to its target (SimMIM's 1x1 conv + PixelShuffle(p)
        for a ViT, written per token)."""
        head = nn.Linear(self.cfg.embed_dim, target_dim(self.cfg))
        init_linear_and_norm(head)
        return head

    def _init_mask_token(self) -> None:
        """SimMIM's ViT init of the mask token: N(0, .02) truncated at +-.02."""
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def _count_masked(self) -> int:
        """Hidden patches per image: whole units (``ceil(units * ratio)`` of them, SimMIM's count), or MAE's."""
        length, ratio = self.cfg.num_patches, self.cfg.mask_ratio
        if self.mask_unit is None:
            return length - num_kept(length, ratio)
        h, w = image_hw(self.cfg)
        units = (h // self.mask_unit) * (w // self.mask_unit)
        return math.ceil(units * ratio) * (self.mask_unit // self.cfg.patch_size) ** 2

    # ------------------------------------------------------------------ masking
    def draw_noise(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        rows: range | None = None,
    ) -> torch.Tensor:
        """Masking noise [batch_size, L] (or its ``rows``, [len(rows), L]; ``generator`` advances as for the whole
        batch); :meth:`mask_from_noise` hides the patches with the largest noise.

        With mask units every patch of a unit gets the unit's rank (0 .. units-1, from a uniform draw per unit)
        divided by the number of units, so the hidden patches are whole units; otherwise the noise of the
        model's ``mask_type`` (:func:`maelab.models.masking.make_noise`)."""
        cfg = self.cfg
        if self.mask_unit is None:
            return make_noise(cfg.mask_type, batch_size, cfg.grid_size, cfg.mask_ratio, device, generator, rows)
        h, w = image_hw(cfg)
        uh, uw = h // self.mask_unit, w // self.mask_unit
        scale = self.mask_unit // cfg.patch_size
        uniform = torch.rand(batch_size, uh * uw, device=device, generator=generator)
        if rows is not None:
            uniform = uniform[rows.start : rows.stop : rows.step]
        # ranks, not the draws themselves: distinct values, so no two units tie at the cut
        ranks = uniform.argsort(dim=1).argsort(dim=1).float() / (uh * uw)
        per_patch = ranks.view(-1, uh, 1, uw, 1).expand(-1, uh, scale, uw, scale)
        return per_patch.reshape(-1, cfg.num_patches)

    @property
    def noise_on_cpu(self) -> bool:
        """Block masks are drawn on the CPU (rectangles, one sample at a time): their generator lives there."""
        return self.mask_unit is None and self.cfg.mask_type == "block"

    def mask_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """noise [B, L] -> mask [B, L] bool: the ``num_masked`` patches with the largest noise hidden (the
        complement of MAE's kept patches, :func:`maelab.models.masking.masking_from_noise`, for the same noise)."""
        ids_shuffle = torch.argsort(noise, dim=1)
        mask = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
        return mask.scatter_(1, ids_shuffle[:, noise.shape[1] - self.num_masked :], True)

    # ------------------------------------------------------------------ stages
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W], mask [B, L] bool -> latent [B, 1 + L, D] (cls first, normed)."""
        enc = self.vit
        x = embed_tokens(enc, imgs, mask, self.mask_token)
        x = run_blocks(enc.blocks, x, self.cfg.grad_checkpointing and self.training)
        return enc.norm(x)

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target [B, L, D], mask [B, L] bool -> the loss over the hidden patches (module docstring)."""
        if self.options.loss == "mse":
            return masked_mse(pred, target, mask)
        abs_sum = (pred.float() - target.float()).abs().sum(dim=-1)  # [B, L]
        weight = mask.to(abs_sum.dtype)
        chans = self.cfg.in_chans
        hidden_pixels = weight.sum() * (target.shape[-1] // chans)
        return (abs_sum * weight).sum() / (hidden_pixels + L1_EPS) / chans

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> MaskedEncoderOutput:
        """imgs [B, C, H, W]; noise [B, L] from :meth:`draw_noise` (fresh noise if None)."""
        check_images(self.cfg, imgs)
        if noise is None:
            noise = self.draw_noise(imgs.shape[0], imgs.device)
        mask = self.mask_from_noise(noise)
        pred = self.predict(self.forward_encoder(imgs, mask))
        loss = self.forward_loss(pred, regression_target(self.cfg, imgs), mask)
        return MaskedEncoderOutput(loss, pred, mask)

    def predict(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + L, D] from :meth:`forward_encoder` -> pred [B, L, target dim] (the patch tokens' head)."""
        return self.head(latent[:, 1:, :])

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder output for the full image, no mask tokens: [B, 1 + L, D] (timm's forward_features)."""
        check_images(self.cfg, imgs)
        return self.vit.forward_features(imgs)

    @property
    def vit(self) -> VisionTransformer:
        """``self.encoder`` as the timm ViT it is (a subclass may build another encoder)."""
        return cast(VisionTransformer, self.encoder)

    # ------------------------------------------------------------------ training plumbing
    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: the encoder's."""
        return list(self.vit.blocks)

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters``) of tokens and position embeddings."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token"}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's own key names (no mask token, no head)."""
        return dict(self.encoder.state_dict())
