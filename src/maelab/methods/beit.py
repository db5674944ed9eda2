"""BEiT (Bao et al. 2022, microsoft/unilm ``beit/modeling_pretrain.py``): masked image modeling with visual tokens.

``imgs -> frozen tokenizer -> codes [B, L] (the targets); mask from noise -> ViT on every patch, hidden ones
replaced by the mask token -> Linear head to codebook_size logits at the hidden patches -> cross-entropy against
their codes``.

The encoder, mask token and masking are :class:`~maelab.methods.masked_encoder.MaskedEncoder`'s (per-patch
masking by the model's ``mask_type``; BEiT's defaults: block masking at 40%, blocks of at least 16 patches with
aspect ratios 0.3 to 1/0.3, :func:`maelab.models.masking.block_mask`); the head is BEiT's ``lm_head``, applied to
the hidden patches only. The tokenizer is our VQ-VAE (:mod:`maelab.methods.tokenizer`, trained by ``maelab
tokenizer``) in place of DALL-E's dVAE: its code grid must be the model's patch grid, and it sees the same
(normalized) image as the encoder, where BEiT gives the dVAE a second 112 px view.

The tokenizer is frozen and not part of the model's weights: it is kept in a plain attribute (not a submodule), so
it is in neither ``parameters()`` (the optimizer, DDP, FSDP) nor ``state_dict()`` (checkpoints, export); ``to()`` /
``cuda()`` move it with the model (:meth:`BEiT._apply`) and it stays in eval mode (:meth:`BEiT.train`).

Deviations from the official model, so that the encoder is the same timm ViT as MAE's: a fixed sin-cos position
embedding (BEiT: relative position biases shared by the blocks), no layer scale, MAE's weight initialization.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import CheckpointError
from maelab.methods.masked_encoder import MaskedEncoder
from maelab.methods.options import MaskedEncoderOptions, option_error
from maelab.methods.tokenizer import VQTokenizer, load_tokenizer
from maelab.methods.vit import check_images, image_hw


class BEiTOutput(NamedTuple):
    """loss: scalar cross-entropy over the hidden patches; pred: [B, L] long, the predicted code (argmax) at hidden
    patches and the tokenizer's code at visible ones; mask: [B, L] bool (True = hidden); target: [B, L] long, the
    tokenizer's codes; accuracy: scalar fraction of hidden patches whose code is predicted; pixels: in eval mode the
    tokenizer's decoding of ``pred`` [B, C, H, W] (for the figures), None in training."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    accuracy: torch.Tensor
    pixels: torch.Tensor | None


def checked_tokenizer(path: str, cfg: ModelConfig) -> VQTokenizer:
    """The tokenizer at ``path`` (``method_args.tokenizer``), which must tokenize the model's input: the same image
    size and channels, one code per patch. A one-line ConfigError otherwise (a missing path, another grid)."""
    if not Path(path).exists():
        raise option_error(
            "tokenizer", path, "no such run directory or file; train one with `maelab tokenizer --output DIR`"
        )
    try:
        tokenizer = load_tokenizer(path)
    except CheckpointError as e:
        raise option_error("tokenizer", path, str(e)) from e
    tc = tokenizer.cfg
    found = (tc.image_hw, tc.grid_size, tc.in_chans)
    wanted = (image_hw(cfg), cfg.grid_size, cfg.in_chans)
    if found != wanted:

        def show(hw: tuple[int, int], grid: tuple[int, int], chans: int) -> str:
            return f"{hw[0]}x{hw[1]} px, {grid[0]}x{grid[1]} codes, {chans} channels"

        raise option_error(
            "tokenizer", path, f"it tokenizes {show(*found)}; the model needs {show(*wanted)} (one code per patch)"
        )
    return tokenizer


class BEiT(MaskedEncoder):
    """A :class:`MaskedEncoder` whose head predicts the frozen tokenizer's code of each hidden patch."""

    tokenizer: VQTokenizer

    def __init__(self, cfg: ModelConfig, tokenizer: VQTokenizer) -> None:
        """``tokenizer``: the frozen tokenizer of the targets (:func:`checked_tokenizer` loads and checks one)."""
        super().__init__(cfg, MaskedEncoderOptions(mask_unit=None))
        object.__setattr__(self, "tokenizer", tokenizer)  # not a submodule
        self.head = nn.Linear(cfg.embed_dim, self.tokenizer.cfg.codebook_size)  # BEiT's lm_head
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ the frozen tokenizer
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BEiT:
        """Module conversions (``to``, ``cuda``, ``half``, ...) apply to the tokenizer too."""
        super()._apply(fn, recurse)
        self.tokenizer._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> BEiT:
        """Train or eval mode for the model; the tokenizer stays in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> BEiTOutput:  # type: ignore[override]
        """imgs [B, C, H, W]; noise [B, L] from :meth:`draw_noise` (fresh noise if None)."""
        check_images(self.cfg, imgs)
        if noise is None:
            noise = self.draw_noise(imgs.shape[0], imgs.device)
        mask = self.mask_from_noise(noise)
        target = self.tokenizer.encode(imgs)  # [B, L], no gradient
        latent = self.forward_encoder(imgs, mask)[:, 1:, :]  # [B, L, D]
        # the hidden patches' positions, in order: exactly num_masked per image, so no host sync
        hidden = torch.argsort(mask.to(torch.uint8), dim=1, descending=True, stable=True)[:, : self.num_masked]
        tokens = latent.gather(1, hidden[..., None].expand(-1, -1, latent.shape[-1]))  # [B, M, D]
        logits = self.head(tokens)  # [B, M, K]
        hidden_target = target.gather(1, hidden)  # [B, M]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), hidden_target.flatten())
        with torch.no_grad():
            guess = logits.argmax(dim=-1)
            accuracy = (guess == hidden_target).float().mean()
            pred = target.scatter(1, hidden, guess)
            pixels = None if self.training else self.tokenizer.decode_codes(pred)
        return BEiTOutput(loss, pred, mask, target, accuracy, pixels)


def beit_figure(cfg: ModelConfig, imgs: torch.Tensor, out: BEiTOutput) -> dict[str, torch.Tensor] | None:
    """:func:`maelab.viz.reconstruct`'s images with the tokenizer's decoding of the predicted codes as the
    reconstruction (visible patches: of their own codes); None without ``out.pixels`` (a training-mode output)."""
    from maelab.models.patches import patchify
    from maelab.viz import reconstruct

    if out.pixels is None:
        return None
    pred = patchify(out.pixels.float().cpu(), cfg.patch_size)
    return reconstruct(imgs, pred, out.mask.cpu(), cfg.patch_size, norm_pix_loss=False)


__all__ = ["BEiT", "BEiTOutput", "beit_figure", "checked_tokenizer"]
