"""Official checkpoint layout, timm compatibility, export/import, state-dict key names."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from maelab.errors import CheckpointError
from maelab.models.registry import create_model
from maelab.models.weights import (
    export_encoder,
    infer_model_config,
    load_exported_encoder,
    load_official_checkpoint,
    read_export_metadata,
)

TINY = dict(depth=2, embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
HEADS = dict(num_heads=2, decoder_num_heads=2)  # head counts cannot be read from tensor shapes


def tiny(**overrides):
    return create_model("mae_vit_pico_patch4_32", **{**TINY, **overrides})


def official_keys(depth: int, decoder_depth: int) -> list[str]:
    """Key names of facebookresearch/mae ``MaskedAutoencoderViT.state_dict()`` (qkv_bias=True)."""

    def block(prefix: str) -> list[str]:
        names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
        return [f"{prefix}.{n}.{t}" for n in names for t in ("weight", "bias")]

    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += block(f"blocks.{i}")
    keys += [
        "norm.weight",
        "norm.bias",
        "mask_token",
        "decoder_pos_embed",
        "decoder_embed.weight",
        "decoder_embed.bias",
    ]
    for i in range(decoder_depth):
        keys += block(f"decoder_blocks.{i}")
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def official_encoder_keys(depth: int) -> list[str]:
    return [k for k in official_keys(depth, 0) if not k.startswith(("decoder_", "mask_token"))]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- key names
def test_state_dict_keys_are_official_names() -> None:
    sd = tiny(decoder_depth=2).state_dict()
    assert set(sd) == set(official_keys(2, 2))
    assert not any(k.startswith("encoder.") for k in sd)
    # encoder keys come first, then decoder keys, as in the official model
    keys = list(sd)
    first_dec = min(i for i, k in enumerate(keys) if k.startswith(("decoder_", "mask_token")))
    assert all(not k.startswith(("decoder_", "mask_token")) for k in keys[:first_dec])
    assert all(k.startswith(("decoder_", "mask_token")) for k in keys[first_dec:])


def test_state_dict_round_trip_strict() -> None:
    torch.manual_seed(0)
    a = tiny()
    torch.manual_seed(1)
    b = tiny()
    assert not torch.equal(a.mask_token, b.mask_token)
    b.load_state_dict(a.state_dict(), strict=True)
    assert_same_tensors(a.state_dict(), b.state_dict())
    assert torch.equal(a.encoder.blocks[1].attn.qkv.weight, b.encoder.blocks[1].attn.qkv.weight)


class Wrapper(nn.Module):
    def __init__(self, mae: nn.Module) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.mae = mae
        self.tail = nn.ModuleDict({"encoder": nn.Linear(2, 2)})  # an unrelated "encoder" elsewhere


def test_nested_state_dict_prefixes_and_round_trip() -> None:
    torch.manual_seed(0)
    a = Wrapper(tiny())
    torch.manual_seed(1)
    b = Wrapper(tiny())
    sd = a.state_dict()
    mae_keys = {k.removeprefix("mae.") for k in sd if k.startswith("mae.")}
    assert mae_keys == set(official_keys(2, 1))
    assert {k for k in sd if not k.startswith("mae.")} == {
        "head.weight",
        "head.bias",
        "tail.encoder.weight",
        "tail.encoder.bias",
    }
    b.load_state_dict(sd, strict=True)
    assert_same_tensors(a.state_dict(), b.state_dict())
    # the sub-module's own state dict is the official layout too, and loads into a bare MAE
    c = tiny()
    c.load_state_dict(a.mae.state_dict(), strict=True)
    assert_same_tensors(c.state_dict(), a.mae.state_dict())


def test_strict_load_rejects_missing_and_extra_keys() -> None:
    model = tiny()
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(RuntimeError):
        tiny().load_state_dict(missing, strict=True)
    extra = {**sd, "blocks.9.norm1.weight": torch.ones(64)}
    with pytest.raises(RuntimeError):
        tiny().load_state_dict(extra, strict=True)


# ---------------------------------------------------------------- official checkpoints
def test_full_official_layout_loads_strictly() -> None:
    torch.manual_seed(0)
    src = tiny(norm_pix_loss=True).eval()
    model = load_official_checkpoint({"model": src.state_dict()}, **HEADS, norm_pix_loss=True).eval()
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size, cfg.in_chans) == (64, 2, 4, 32, 3)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio) == (32, 1, 4.0)
    assert_same_tensors(model.state_dict(), src.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(imgs, noise=noise).loss, src(imgs, noise=noise).loss)


def test_checkpoint_file_with_module_prefix_loads(tmp_path) -> None:
    src = tiny()
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    model = load_official_checkpoint(path, **HEADS)
    assert_same_tensors(model.state_dict(), src.state_dict())


def test_encoder_only_official_layout_loads_into_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    src = tiny()
    enc_sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(enc_sd) == set(official_encoder_keys(2))
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": enc_sd}, path)
    model = load_official_checkpoint(path, **HEADS, decoder_embed_dim=32, decoder_depth=1)
    assert_same_tensors(model.encoder.state_dict(), enc_sd)
    assert model.cfg.decoder_embed_dim == 32 and len(model.decoder_blocks) == 1
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(imgs), src.eval().forward_features(imgs))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_timm_vit_state_dict_loads(num_classes: int) -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
    ).eval()
    sd = vit.state_dict()
    enc_keys = {k for k in sd if not k.startswith("head.")}
    assert enc_keys == set(official_encoder_keys(2))  # timm's names are the official encoder names
    model = load_official_checkpoint(sd, **HEADS).eval()
    assert_same_tensors(model.encoder.state_dict(), {k: sd[k] for k in enc_keys})
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), vit.forward_features(imgs))


@pytest.mark.parametrize(
    "drop",
    [
        "norm.weight",
        "decoder_norm.bias",
        "blocks.1.attn.proj.bias",
        "mask_token",
        "decoder_blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc1.weight",
        "pos_embed",
        "patch_embed.proj.weight",
    ],
)
def test_missing_key_raises_checkpoint_error(drop: str) -> None:
    sd = dict(tiny().state_dict())
    del sd[drop]
    with pytest.raises(CheckpointError):
        load_official_checkpoint({"model": sd}, **HEADS)


def test_missing_key_in_encoder_only_checkpoint_raises() -> None:
    sd = {k: v for k, v in tiny().state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    del sd["blocks.0.norm2.bias"]
    with pytest.raises(CheckpointError):
        load_official_checkpoint(sd, **HEADS)


@pytest.mark.parametrize("extra", ["blocks.0.attn.extra", "decoder_blocks.0.extra.weight", "foo.bar"])
def test_extra_key_raises_checkpoint_error(extra: str) -> None:
    sd = dict(tiny().state_dict())
    sd[extra] = torch.zeros(3)
    with pytest.raises(CheckpointError):
        load_official_checkpoint({"model": sd}, **HEADS)


def test_shape_mismatch_raises_checkpoint_error() -> None:
    sd = dict(tiny().state_dict())
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 32)  # does not match the 8x8 grid of pos_embed
    with pytest.raises(CheckpointError):
        load_official_checkpoint({"model": sd}, **HEADS)


def test_not_a_checkpoint_raises(tmp_path) -> None:
    with pytest.raises(CheckpointError):
        load_official_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError):
        load_official_checkpoint(bad)
    with pytest.raises(CheckpointError):
        load_official_checkpoint({"model": {"epoch": 1}})


def test_vit_base_official_layout_is_inferred() -> None:
    with torch.device("meta"):  # shapes only: no 111M-parameter allocation
        sd = create_model("mae_vit_base_patch16").state_dict()
    assert set(sd) == set(official_keys(12, 8))
    cfg = infer_model_config(sd)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (768, 12, 12, 16, 224)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert cfg.mlp_ratio == 4.0 and cfg.in_chans == 3
    enc_only = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    cfg = infer_model_config(enc_only)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (768, 12, 12, 16)


def test_non_square_needs_img_size() -> None:
    src = tiny(img_size=(32, 48))
    with pytest.raises(CheckpointError):
        load_official_checkpoint(src.state_dict(), **HEADS)
    model = load_official_checkpoint(src.state_dict(), img_size=(32, 48), **HEADS)
    assert_same_tensors(model.state_dict(), src.state_dict())


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("in_chans,img_size", [(3, 32), (1, (32, 48))])
def test_export_round_trip_and_timm_strict_load(tmp_path, in_chans, img_size) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = tiny(in_chans=in_chans, img_size=img_size).eval()
    path = export_encoder(model, tmp_path / "sub" / "encoder.safetensors")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    rebuilt = load_exported_encoder(path).eval()
    hw = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    imgs = torch.randn(2, in_chans, *hw)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(imgs), model.forward_features(imgs))

    meta = read_export_metadata(path)
    kwargs = dict(meta["timm_kwargs"])
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    vit = timm.create_model(meta["timm_name"], pretrained=False, **kwargs).eval()
    tensors = load_file(str(path))
    vit.load_state_dict(tensors, strict=True)
    assert set(tensors) == {k for k in model.state_dict() if not k.startswith(("decoder_", "mask_token"))}
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.forward_features(imgs))
    # the exported file is also an encoder-only official checkpoint
    again = load_official_checkpoint(path, img_size=img_size, **HEADS, in_chans=in_chans)
    assert_same_tensors(again.encoder.state_dict(), tensors)


def test_foreign_safetensors_has_no_export_metadata(tmp_path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError):
        read_export_metadata(p)
    with pytest.raises(CheckpointError):
        load_exported_encoder(p)
