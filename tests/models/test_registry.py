"""Model presets: valid configs, the paper's numbers, parameter counts, errors and overrides."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.models.registry import create_model, get_config, list_models

# (embed_dim, depth, heads) of the standard ViTs (Dosovitskiy et al.; DeiT for tiny/small)
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def expected_trainable_params(cfg: ModelConfig) -> int:
    """Closed-form count for the official MAE (qkv bias, fixed sin-cos pos embeds excluded)."""

    def block(d: int, ratio: float) -> int:
        hidden = int(d * ratio)
        return (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d

    d, dd, c, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.in_chans, cfg.patch_size
    encoder = d * c * p * p + d + d + cfg.depth * block(d, cfg.mlp_ratio) + 2 * d  # patch, cls, blocks, norm
    decoder = (d * dd + dd) + dd + cfg.decoder_depth * block(dd, cfg.mlp_ratio) + 2 * dd + (dd * p * p * c + p * p * c)
    return encoder + decoder


def test_list_models_sorted_and_nonempty() -> None:
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    for required in (
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
        "mae_vit_tiny_patch4_32",
        "mae_vit_pico_patch4_32",
    ):
        assert required in names


@pytest.mark.parametrize("name", list_models())
def test_every_preset_is_a_valid_config(name: str) -> None:
    cfg = get_config(name)
    assert isinstance(cfg, ModelConfig)
    again = ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})
    assert again == cfg  # passes validation when rebuilt from its fields
    h, w = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    assert h % cfg.patch_size == 0 and w % cfg.patch_size == 0
    assert cfg.embed_dim % cfg.num_heads == 0 and cfg.decoder_embed_dim % cfg.decoder_num_heads == 0
    assert 0 <= cfg.mask_ratio < 1
    assert cfg.timm_kwargs()["embed_dim"] == cfg.embed_dim and cfg.timm_kwargs()["num_classes"] == 0
    for size, (dim, depth, heads) in VIT_SIZES.items():
        if f"_{size}_" in name and cfg.encoder == "vit":
            assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (dim, depth, heads)
    if "_patch" in name:
        patch = int(name.split("_patch")[1].split("_")[0])
        assert cfg.patch_size == patch
    if name.endswith("_32"):
        assert cfg.img_size == 32
    if cfg.encoder == "swin":  # Swin-T / Swin-B of Liu et al. (first-stage width, heads, and per-stage blocks)
        sizes = {"tiny": (96, 3), "base": (128, 4)}
        for size, (dim, heads) in sizes.items():
            if f"_{size}_" in name:
                assert (cfg.embed_dim, cfg.num_heads) == (dim, heads)
        if "patch4" in name:
            assert cfg.depths == ((2, 2, 6, 2) if "_tiny_" in name else (2, 2, 18, 2))
        window = int(name.split("_window")[1].split("_")[0])
        assert cfg.window_size == window


def test_paper_presets() -> None:
    for name, (dim, depth, heads), patch in (
        ("mae_vit_base_patch16", VIT_SIZES["base"], 16),
        ("mae_vit_large_patch16", VIT_SIZES["large"], 16),
        ("mae_vit_huge_patch14", VIT_SIZES["huge"], 14),
    ):
        cfg = get_config(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (
            dim,
            depth,
            heads,
            patch,
            224,
        )
        # paper: decoder 512-d, 8 blocks, 16 heads; mask ratio 75 %, random sampling, mlp ratio 4
        assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
        assert cfg.mask_ratio == 0.75 and cfg.mask_type == "random" and cfg.mlp_ratio == 4.0
        assert cfg.in_chans == 3


def test_vit_base_parameter_count() -> None:
    cfg = get_config("mae_vit_base_patch16")
    formula = expected_trainable_params(cfg)
    assert abs(formula - 111.65e6) < 0.05e6  # the official MAE ViT-B (with decoder) has ~111.65M
    with torch.device("meta"):  # count without allocating
        model = create_model("mae_vit_base_patch16")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == formula
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == (1 + 196) * (768 + 512)  # the two sin-cos tables
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert abs(encoder - 85.65e6) < 0.05e6  # ViT-B/16 body without head


@pytest.mark.parametrize(
    "overrides",
    [
        dict(depth=2, embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
        dict(
            depth=1,
            embed_dim=32,
            num_heads=4,
            decoder_embed_dim=16,
            decoder_depth=2,
            decoder_num_heads=1,
            in_chans=1,
            patch_size=8,
            img_size=[16, 24],
            norm_pix_loss=True,
        ),
    ],
)
def test_small_models_match_formula_and_overrides(overrides) -> None:
    model = create_model("mae_vit_pico_patch4_32", **overrides)
    cfg = model.cfg
    for k, v in overrides.items():
        assert getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v), k
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable_params(cfg)
    assert len(model.encoder.blocks) == cfg.depth and len(model.decoder_blocks) == cfg.decoder_depth
    assert model.encoder.blocks[0].attn.num_heads == cfg.num_heads
    if cfg.decoder_depth:
        assert model.decoder_blocks[0].attn.num_heads == cfg.decoder_num_heads


def test_overrides_do_not_mutate_presets() -> None:
    before = get_config("mae_vit_base_patch16")
    changed = get_config("mae_vit_base_patch16", norm_pix_loss=True, mask_ratio=0.5)
    assert changed.norm_pix_loss and changed.mask_ratio == 0.5
    assert get_config("mae_vit_base_patch16") == before and not before.norm_pix_loss


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        get_config("mae_vit_gigantic_patch99")
    msg = str(info.value)
    assert "mae_vit_gigantic_patch99" in msg
    for name in list_models():
        assert name in msg
    with pytest.raises(ConfigError):
        create_model("nope")


def test_bad_overrides_raise_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        get_config("mae_vit_pico_patch4_32", embed_dims=64)
    assert "embed_dims" in str(info.value)
    with pytest.raises(ConfigError):
        get_config("mae_vit_pico_patch4_32", mask_ratio=1.0)
    with pytest.raises(ConfigError):
        get_config("mae_vit_pico_patch4_32", embed_dim=100, num_heads=3)
    with pytest.raises(ConfigError):
        get_config("mae_vit_pico_patch4_32", mask_type="checkerboard")
