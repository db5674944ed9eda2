"""Named presets: ``create_model(name, **overrides)`` -> MaskedAutoencoder."""

from __future__ import annotations

from typing import Any

from maelab.config import ModelConfig, from_dict, to_dict
from maelab.errors import ConfigError

_PAPER_DECODER: dict[str, Any] = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_IMAGE_DECODER: dict[str, Any] = dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)

_ENCODERS = {  # name: (timm name, embed_dim, depth, heads)
    "tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "small": ("vit_small_patch16_224", 384, 12, 6),
    "base": ("vit_base_patch16_224", 768, 12, 12),
    "large": ("vit_large_patch16_224", 1024, 24, 16),
    "huge": ("vit_huge_patch14_224", 1280, 32, 16),
}

PRESETS: dict[str, ModelConfig] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, cfg: ModelConfig, description: str) -> None:
    PRESETS[name] = cfg
    DESCRIPTIONS[name] = description


def _encoder(size: str, **kw: Any) -> dict[str, Any]:
    timm_name, dim, depth, heads = _ENCODERS[size]
    return dict(timm_name=timm_name, embed_dim=dim, depth=depth, num_heads=heads, **kw)


for _size, _patch in (("tiny", 16), ("small", 16), ("base", 16), ("large", 16), ("huge", 14)):
    register(
        f"mae_vit_{_size}_patch{_patch}",
        ModelConfig(img_size=224, patch_size=_patch, **_encoder(_size), **_PAPER_DECODER),
        f"ViT-{_size[0].upper()}/{_patch}, 224 px, paper decoder 512x8",
    )

for _size in ("tiny", "small"):
    for _patch in (2, 4):
        register(
            f"mae_vit_{_size}_patch{_patch}_32",
            ModelConfig(img_size=32, patch_size=_patch, **_encoder(_size), **_SMALL_IMAGE_DECODER),
            f"ViT-{_size[0].upper()}/{_patch} for 32x32 images (CIFAR), decoder 256x4",
        )

register(
    "mae_vit_pico_patch4_32",
    ModelConfig(
        img_size=32,
        patch_size=4,
        timm_name="vit_tiny_patch16_224",
        embed_dim=96,
        depth=4,
        num_heads=3,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "laptop-sized ViT (96 dims, 4 blocks) for 32x32 images: quick starts and tests",
)


# Swin Transformers (SimMIM's hierarchical encoder; ``method=simmim`` only). embed_dim and num_heads are the first
# stage's and double at each later stage; no decoder (SimMIM's head is a 1x1 convolution + PixelShuffle).
_SWIN: dict[str, Any] = dict(encoder="swin", decoder_embed_dim=64, decoder_depth=0, decoder_num_heads=1)
for _name, _img, _patch, _window, _dim, _depths, _heads, _what in (
    ("swin_tiny_patch4_window7_224", 224, 4, 7, 96, (2, 2, 6, 2), 3, "Swin-T, 224 px, window 7"),
    ("swin_base_patch4_window7_224", 224, 4, 7, 128, (2, 2, 18, 2), 4, "Swin-B, 224 px, window 7 (fine-tuning)"),
    ("swin_base_patch4_window6_192", 192, 4, 6, 128, (2, 2, 18, 2), 4, "Swin-B, 192 px, window 6 (SimMIM)"),
    ("swin_tiny_patch2_window4_32", 32, 2, 4, 96, (2, 2, 6), 3, "Swin-T-like, 3 stages, for 32x32 images (CIFAR)"),
    ("swin_pico_patch2_window4_32", 32, 2, 4, 32, (2, 2, 2), 2, "laptop-sized Swin (32-128 dims, 3 stages), 32x32"),
):
    register(
        _name,
        ModelConfig(
            img_size=_img,
            patch_size=_patch,
            window_size=_window,
            embed_dim=_dim,
            depths=_depths,
            num_heads=_heads,
            timm_name="swin_tiny_patch4_window7_224" if _dim == 96 else "swin_base_patch4_window7_224",
            **_SWIN,
        ),
        _what,
    )


def list_models() -> list[str]:
    """Preset names, sorted."""
    return sorted(PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig with field overrides (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(list_models())} (see `maelab models`)")
    base = to_dict(PRESETS[name])
    try:
        return from_dict(ModelConfig, {**base, **overrides}, prefix="model_args.")
    except ConfigError as e:
        raise ConfigError(f"{e} (model {name})") from None


def create_model(name: str, **overrides: Any):  # -> MaskedAutoencoder
    """Build a preset MAE (``maelab models`` lists the names); ``overrides`` set ModelConfig fields.

    >>> import torch, maelab
    >>> model = maelab.create_model("mae_vit_pico_patch4_32", norm_pix_loss=True)
    >>> imgs = torch.randn(2, 3, 32, 32)
    >>> out = model(imgs, noise=torch.rand(2, 64))  # 8 x 8 patches of 4 px; the same noise gives the same mask
    >>> out.pred.shape, out.mask.shape, int(out.mask.sum(1)[0])  # pred [B, L, p*p*C]; mask True = hidden
    (torch.Size([2, 64, 48]), torch.Size([2, 64]), 48)
    >>> model.forward_features(imgs).shape  # encoder on the full image: [B, 1 + L, D]
    torch.Size([2, 65, 96])
    """
    from maelab.models.mae import MaskedAutoencoder

    return MaskedAutoencoder(get_config(name, **overrides))
