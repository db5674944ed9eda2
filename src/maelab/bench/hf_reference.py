"""Hugging Face ``transformers`` ViTMAE as a speed reference for ``maelab bench``.

The model is built from a config matching a :class:`~maelab.config.ModelConfig` with random
weights; nothing is ever downloaded. Same architecture (pre-norm ViT blocks with qkv bias,
exact GELU, LayerNorm eps 1e-6, fixed sin-cos position embeddings), same random-masking
convention (keep the smallest ``noise``), same (normalized-)pixel loss. HF ViTMAE only does
random masking and square images; ``mask_type`` is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from maelab.config import ModelConfig
from maelab.models.hf import hf_config

if TYPE_CHECKING:
    from transformers import ViTMAEForPreTraining


def hf_available() -> bool:
    """True if ``transformers`` with ViTMAE can be imported."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: F401
    except Exception:
        return False
    return True


def build_hf_mae(cfg: ModelConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """``transformers.ViTMAEForPreTraining`` with randomly initialized weights matching ``cfg``.

    Raises ValueError for non-square images (HF ViTMAE's position embeddings and patchify
    assume a square grid) and ImportError if transformers is not installed.
    """
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except Exception as e:
        raise ImportError("the Hugging Face reference needs transformers: pip install 'maelab[hf]'") from e
    size = cfg.img_size
    if isinstance(size, (tuple, list)) and size[0] != size[1]:
        raise ValueError(f"Hugging Face ViTMAE supports square images only, got img_size={tuple(size)}")
    # PreTrainedConfig takes attn_implementation as an extra keyword its dataclass signature does not list
    hf_cfg = ViTMAEConfig(**hf_config(cfg), attn_implementation=attn_implementation)  # type: ignore[call-arg]
    model = ViTMAEForPreTraining(hf_cfg)
    _init_like_official(model, cfg)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@torch.no_grad()
def _init_like_official(model: ViTMAEForPreTraining, cfg: ModelConfig) -> None:
    """Fixed sin-cos position embeddings and a N(0, 0.02) mask token, as the official MAE.

    transformers 5.x leaves ``position_embeddings``, ``decoder_pos_embed`` and ``mask_token``
    all zero when the model is built from a config (its second ``post_init`` pass zeroes
    them), which would not change the speed but makes the loss meaningless.
    """
    from maelab.models.pos_embed import sincos_2d

    grid = cfg.grid_size
    enc = model.vit.embeddings.position_embeddings
    dec = model.decoder.decoder_pos_embed
    enc.copy_(sincos_2d(enc.shape[-1], grid, cls_token=True).unsqueeze(0))
    dec.copy_(sincos_2d(dec.shape[-1], grid, cls_token=True).unsqueeze(0))
    torch.nn.init.normal_(model.decoder.mask_token, std=0.02)


def hf_loss(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar MAE loss of HF ViTMAE on imgs [B, C, H, W]; noise [B, L] fixes the mask
    (same convention as maelab: the patches with the smallest noise are kept)."""
    return model(pixel_values=imgs, noise=noise).loss
