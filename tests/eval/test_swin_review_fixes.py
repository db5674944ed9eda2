"""The review fixes of the Swin change: pre-training's online kNN pools a Swin by average, ``model_args.encoder``
must match ``timm_name``'s family, fp8 picks a Swin's block Linears only, fine-tuning at another size scales the
window and interpolates the relative position tables, a Swin classifier's head keeps timm's init, SimMIM's
pre-training decays the relative position tables (fine-tuning does not), and ``maelab models`` counts a ViT
encoder without its fixed position embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from tests.conftest import random_mae
from timm.layers import resize_rel_pos_bias_table
from torch import nn

from maelab.cli import _encoder_params
from maelab.config import ModelConfig, PretrainConfig, build_config
from maelab.engine.accel import is_fp8_candidate
from maelab.engine.optim import build_adamw
from maelab.engine.pretrain import pretrain
from maelab.errors import ConfigError
from maelab.eval.classifier import build_classifier, classifier_kwargs, layer_decay_param_groups
from maelab.methods import get_method, method_model_config, method_options
from maelab.methods.swin import SwinMaskedEncoder
from maelab.models.registry import get_config

PICO = "swin_pico_patch2_window4_32"
"""32 px, 2 px patches, window 4, 3 stages of 2 blocks (dims 32-64-128, heads 2-4-8)."""
VIT = "mae_vit_pico_patch4_32"
TABLE = "attn.relative_position_bias_table"


def pico_simmim(**model_args: Any) -> SwinMaskedEncoder:
    """A seeded SimMIM model on the pico Swin, built through the method registry."""
    torch.manual_seed(0)
    method = get_method("simmim")
    model = method.build(method_model_config(method, PICO, model_args), method_options(method, {}))
    assert isinstance(model, SwinMaskedEncoder)
    return model


@pytest.fixture(scope="module")
def pretrained() -> SwinMaskedEncoder:
    """The pico SimMIM model with random (not timm's near-zero) relative position tables, as after pre-training."""
    model = pico_simmim().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(TABLE):
                p.copy_(torch.randn(p.shape))
    return model


# ---------------------------------------------------------------------------------- online kNN
def test_online_knn_of_a_swin_pretraining_pools_by_average(tmp_path: Path) -> None:
    """knn_every=1 on a Swin used to stop the run after its first epoch (invalid pool='cls')."""
    overrides = {
        "model": PICO,
        "method": "simmim",
        "output": str(tmp_path / "run"),
        "epochs": 1,
        "batch_size": 16,
        "warmup_epochs": 0,
        "data.num_samples": 32,
        "data.num_workers": 0,
        "device": "cpu",
        "vis_every": 1000,
        "knn_every": 1,
        "knn_k": 5,
    }
    result = pretrain(build_config(PretrainConfig, None, overrides), progress=False)
    assert result.epoch == 1 and not result.stopped_early
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 0.0 <= records[0]["knn_top1"] <= 100.0, records


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("model", "encoder", "family"), [(VIT, "swin", "vit"), (PICO, "vit", "swin")], ids=["vit-preset", "swin-preset"]
)
def test_an_encoder_of_another_family_than_timm_name_is_one_line(model: str, encoder: str, family: str) -> None:
    timm_name = get_config(model).timm_name
    for make in (
        lambda: get_config(model, encoder=encoder),
        lambda: method_model_config(get_method("simmim"), model, {"encoder": encoder}),
    ):
        with pytest.raises(ConfigError) as e:
            make()
        msg = str(e.value)
        assert msg.startswith(f"invalid model_args.encoder={encoder!r}: timm_name={timm_name!r} is a {family}: ")
        assert "\n" not in msg


def test_a_swins_embed_dim_need_not_be_divisible_by_4() -> None:
    """The divisible-by-4 rule is the ViT's 2-D sin-cos position embedding's; a Swin has none."""
    model = pico_simmim(embed_dim=42).eval()  # stages of 42-84-168 channels, 21 per head
    assert model.cfg.embed_dim == 42
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), noise=model.draw_noise(2, "cpu", torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match=r"^invalid model_args\.embed_dim=42: must be divisible by 4 "):
        get_config(VIT, embed_dim=42, num_heads=3)  # a ViT still needs it


# ---------------------------------------------------------------------------------- fp8
def test_fp8_picks_the_linears_of_a_swins_blocks_only() -> None:
    model = pico_simmim()
    picked = {name for name, module in model.named_modules() if is_fp8_candidate(module, name)}
    expected = {
        f"encoder.layers.{s}.blocks.{b}.{layer}"
        for s in range(3)
        for b in range(2)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert picked == expected
    mergings = {name: m for name, m in model.named_modules() if name.endswith("downsample.reduction")}
    assert sorted(mergings) == ["encoder.layers.1.downsample.reduction", "encoder.layers.2.downsample.reduction"]
    assert all(isinstance(m, nn.Linear) and m.in_features % 16 == m.out_features % 16 == 0 for m in mergings.values())
    # a Linear head (a classifier's) or one named like a merging stays out too, whatever its dims
    for name in ("head", "head.fc", "encoder.head.fc", "encoder.layers.0.downsample.reduction"):
        assert not is_fp8_candidate(nn.Linear(128, 128), name), name


# ---------------------------------------------------------------------------------- fine-tuning at another size
@pytest.mark.parametrize(
    ("model", "img_size", "window"),
    [(PICO, 64, 8), (PICO, (64, 64), 8), (PICO, 48, 6), (PICO, 44, 4), ("swin_base_patch4_window6_192", 224, 7)],
    ids=["pico-64", "pico-64x64", "pico-48", "pico-44-kept", "base-192-to-224"],
)
def test_fine_tuning_at_another_size_scales_the_window_when_whole(
    model: str, img_size: int | tuple[int, int], window: int
) -> None:
    cfg: ModelConfig = method_model_config(get_method("simmim"), model)
    kwargs = classifier_kwargs(cfg, 10, img_size=img_size)
    assert kwargs["window_size"] == window and kwargs["img_size"] == img_size
    assert classifier_kwargs(cfg, 10)["window_size"] == cfg.window_size  # at the pre-training's size


def test_fine_tuning_at_64px_interpolates_the_relative_position_tables(pretrained: SwinMaskedEncoder) -> None:
    clf = build_classifier(pretrained, 4, pool="avg", drop_path=0.0, img_size=64).eval()
    own = clf.state_dict()
    saved = pretrained.encoder_state_dict()
    tables = [k for k in saved if k.endswith(TABLE)]
    assert len(tables) == 6
    for key in tables:
        heads = saved[key].shape[1]
        assert saved[key].shape == (7 * 7, heads) and own[key].shape == (15 * 15, heads), key
        expected = resize_rel_pos_bias_table(saved[key], new_window_size=(8, 8), new_bias_shape=(15 * 15, heads))
        assert torch.equal(own[key], expected), key
    for key in ("patch_embed.proj.weight", "layers.1.blocks.0.attn.qkv.weight", "layers.2.downsample.reduction.weight"):
        assert torch.equal(own[key], saved[key]), key
    with torch.no_grad():
        logits = clf(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------- head init
def test_a_swin_classifiers_head_keeps_timms_init_and_a_vits_is_mae_s(pretrained: SwinMaskedEncoder) -> None:
    torch.manual_seed(0)
    swin_head = build_classifier(pretrained, 10, pool="avg").get_classifier()
    vit_head = build_classifier(random_mae(), 10, pool="avg").get_classifier()
    assert isinstance(swin_head, nn.Linear) and isinstance(vit_head, nn.Linear)
    assert 0.01 < swin_head.weight.std().item() < 0.03  # timm's trunc_normal(std=.02), SimMIM's fine-tuning
    assert vit_head.weight.std().item() < 1e-4  # MAE's trunc_normal(std=2e-5)
    assert torch.all(swin_head.bias == 0) and torch.all(vit_head.bias == 0)


# ---------------------------------------------------------------------------------- weight decay
def test_pretraining_decays_the_relative_position_tables_and_fine_tuning_does_not(
    pretrained: SwinMaskedEncoder,
) -> None:
    assert pretrained.no_weight_decay() == {"mask_token"}
    opt = build_adamw(pretrained, lr=1e-3, weight_decay=0.05, decay_tokens=False)  # SimMIM's exemptions
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(pretrained.named_parameters())
    tables = [name for name in params if name.endswith(TABLE)]
    assert len(tables) == 6 and all(wd_of[id(params[name])] == 0.05 for name in tables)
    assert wd_of[id(params["mask_token"])] == 0.0

    clf = build_classifier(pretrained, 4, pool="avg")
    groups = layer_decay_param_groups(clf, weight_decay=0.05, layer_decay=0.75)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    clf_tables = [p for name, p in clf.named_parameters() if name.endswith(TABLE)]
    assert len(clf_tables) == 6 and all(wd_of[id(p)] == 0.0 for p in clf_tables)


# ---------------------------------------------------------------------------------- maelab models
def test_models_counts_a_vit_encoder_without_its_fixed_position_embedding() -> None:
    cfg = get_config("mae_vit_base_patch16")
    with torch.device("meta"):
        vit = timm.create_model(cfg.timm_name, num_classes=0)
    params = dict(vit.named_parameters())
    trained = sum(p.numel() for p in params.values()) - params["pos_embed"].numel()  # 85,798,656 - 197 * 768
    assert trained == 85_647_360
    assert _encoder_params(cfg) == trained  # what `maelab models` prints (its columns: tests/cli/test_cli.py)
    assert f"{_encoder_params(cfg) / 1e6:.1f}M" == "85.6M"
