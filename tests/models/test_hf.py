"""Hugging Face and timm round trips: ``export --format hf``, ``--checkpoint HF_DIR``, ``pretrain --init`` and
``--init-encoder``. Tiny models built here; nothing is downloaded.

(maelab -> ``from_pretrained`` with the same noise: tests/models/test_vitmae_hf_equivalence.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from tests.conftest import TINY_MODEL_ARGS, error_line

from maelab.cli import main
from maelab.config import to_dict
from maelab.engine.checkpoint import load_pretrained
from maelab.models.hf import load_hf, save_hf
from maelab.models.registry import create_model
from maelab.models.weights import load_exported_encoder

transformers = pytest.importorskip("transformers")

TINY = [f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()]
ONE_STEP = [
    "--epochs",
    "1",
    "--max-steps",
    "1",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "data.num_samples=16",
    "warmup_epochs=1",
    "--no-progress",
]
"""A one-step run: with warmup the first step's lr is 0, so its weights after the step are those it started from."""
D, DEPTH, HEADS, DD, DDEPTH, DHEADS = (
    TINY_MODEL_ARGS[k]
    for k in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (norms and biases too), so that a swapped or missing tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_mae(seed: int, **overrides):
    return randomize(create_model("mae_vit_tiny_patch4_32", **{**TINY_MODEL_ARGS, **overrides}), seed)


def random_hf_mae(seed: int) -> torch.nn.Module:
    """HF ViTMAE with settings maelab maps (norm_pix_loss, mask_ratio, HF's default eps 1e-12 as on the hub)."""
    cfg = transformers.ViTMAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=D,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * D,
        decoder_hidden_size=DD,
        decoder_num_hidden_layers=DDEPTH,
        decoder_num_attention_heads=DHEADS,
        decoder_intermediate_size=4 * DD,
        mask_ratio=0.6,
        norm_pix_loss=True,
    )
    return randomize(transformers.ViTMAEForPreTraining(cfg), seed)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights (official names) in a run's last checkpoint."""
    return torch.load(path / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


# ---------------------------------------------------------------------------------- HF -> maelab
@pytest.mark.parametrize("file", ["model.safetensors", "sharded", "pytorch_model.bin"])
def test_hf_model_loads_as_checkpoint_with_same_mask_pred_loss(tmp_path, capsys, file) -> None:
    """save_pretrained output (safetensors, also in shards), or a snapshot with pytorch_model.bin in transformers
    5's own key names, -> what every --checkpoint goes through -> same mask, prediction and loss as HF for the
    same noise; ``maelab export --checkpoint`` takes the directory too."""
    hf = random_hf_mae(seed=0)
    d = tmp_path / "hf"
    if file == "pytorch_model.bin":
        hf.config.save_pretrained(d)
        torch.save(hf.state_dict(), d / file)
    else:
        hf.save_pretrained(d, **({"max_shard_size": "200KB"} if file == "sharded" else {}))
        assert (d / "model.safetensors.index.json").exists() == (file == "sharded")
    ours = load_pretrained(str(d)).eval()
    assert main(["export", "--checkpoint", str(d), "--output", str(tmp_path / "enc.safetensors")]) == 0
    torch.testing.assert_close(
        load_exported_encoder(tmp_path / "enc.safetensors").state_dict(), ours.encoder_state_dict(), atol=0, rtol=0
    )
    assert (ours.cfg.norm_pix_loss, ours.cfg.mask_ratio) == (True, 0.6)
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 64, generator=g)
    with torch.no_grad():
        out, ref = ours(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    assert torch.equal(out.mask, ref.mask.bool())
    torch.testing.assert_close(out.pred, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_hf_directory_round_trips_exactly(tmp_path) -> None:
    mae = tiny_mae(seed=3, norm_pix_loss=True, mask_ratio=0.5)
    back = load_hf(save_hf(mae, tmp_path / "hf"))
    assert (back.cfg.norm_pix_loss, back.cfg.mask_ratio, back.cfg.num_heads, back.cfg.decoder_num_heads) == (
        True,
        0.5,
        HEADS,
        DHEADS,
    )
    sd, sd_back = mae.state_dict(), back.state_dict()
    assert list(sd) == list(sd_back) and all(torch.equal(sd[k], sd_back[k]) for k in sd)


# ---------------------------------------------------------------------------------- maelab -> HF via the CLI
def test_cli_export_hf_full_and_encoder_only(tmp_path, capsys) -> None:
    """``maelab export --format hf``: ViTMAEForPreTraining gives our mask/pred/loss; ``--encoder-only``:
    ViTModel gives our forward_features and ViTMAEModel our encoder latents for the same noise."""
    mae = tiny_mae(seed=4)
    ckpt = tmp_path / "mae.pt"  # a maelab checkpoint: weights and their ModelConfig (head counts included)
    torch.save({"model": mae.state_dict(), "model_config": to_dict(mae.cfg)}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--output", str(tmp_path / "full")]) == 0
    assert (
        main(
            ["export", "--checkpoint", str(ckpt), "--format", "hf", "--encoder-only", "--output", str(tmp_path / "enc")]
        )
        == 0
    )
    assert "from_pretrained" in capsys.readouterr().out
    g = torch.Generator().manual_seed(5)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 64, generator=g)
    full = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "full").eval()
    vit = transformers.ViTModel.from_pretrained(tmp_path / "enc", add_pooling_layer=False).eval()
    vit_mae = transformers.ViTMAEModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        out, ref = mae(imgs, noise=noise), full(pixel_values=imgs, noise=noise)
        torch.testing.assert_close(out.pred, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.mask, ref.mask.bool())
        torch.testing.assert_close(
            vit(pixel_values=imgs).last_hidden_state, mae.forward_features(imgs), atol=1e-5, rtol=1e-5
        )
        latent = mae.forward_encoder(imgs, torch.argsort(noise, dim=1)[:, :16])
        torch.testing.assert_close(
            vit_mae(pixel_values=imgs, noise=noise).last_hidden_state, latent, atol=1e-5, rtol=1e-5
        )
    enc_back = load_pretrained(str(tmp_path / "enc"))  # an encoder-only directory as --checkpoint
    assert all(torch.equal(v, mae.encoder_state_dict()[k]) for k, v in enc_back.encoder_state_dict().items())


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return save_hf(tiny_mae(seed=6), tmp_path / "hf")


@pytest.mark.parametrize(
    "setting,value",
    [
        ("hidden_act", "gelu_new"),
        ("qkv_bias", False),
        ("layer_norm_eps", 1e-5),
        ("hidden_dropout_prob", 0.1),
        ("attention_probs_dropout_prob", 0.1),
        ("decoder_intermediate_size", 100),
        ("patch_size", [4, 8]),
        ("model_type", "dinov2"),
    ],
)
def test_unrepresentable_hf_setting_is_refused_in_one_line(hf_dir, tmp_path, capsys, setting, value) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, setting: value}))
    err = error_line(capsys, ["export", "--checkpoint", str(hf_dir), "--output", str(tmp_path / "e.safetensors")])
    assert f"{setting}=" in err and str(hf_dir) in err


def test_hf_weights_of_another_shape_are_refused_in_one_line(hf_dir, tmp_path, capsys) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    err = error_line(capsys, ["export", "--checkpoint", str(hf_dir), "--output", str(tmp_path / "e.safetensors")])
    assert "pos_embed" in err


# ---------------------------------------------------------------------------------- pretrain --init / --init-encoder
@pytest.mark.parametrize("kind", ["hf", "official"])
def test_pretrain_init_starts_from_the_full_mae(tmp_path, kind) -> None:
    src = tiny_mae(seed=7)
    if kind == "hf":
        path = save_hf(src, tmp_path / "hf")
    else:
        path = tmp_path / "mae_visualize_tiny.pth"
        torch.save({"model": src.state_dict()}, path)
    out = tmp_path / "run"
    assert main(["pretrain", "--init", str(path), "--output", str(out), *ONE_STEP, *TINY]) == 0
    got, want = weights(out), src.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert f"init: {path}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrain_init_encoder_starts_from_a_timm_vit(tmp_path, suffix) -> None:
    vit = randomize(
        timm.create_model(
            "vit_base_patch16_224", img_size=32, patch_size=4, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=10
        ),
        seed=8,
    )  # a classifier: its head is ignored
    path = tmp_path / f"vit{suffix}"
    save_file(vit.state_dict(), str(path)) if suffix == ".safetensors" else torch.save(vit.state_dict(), path)
    out = tmp_path / "run"
    assert main(["pretrain", "--init-encoder", str(path), "--output", str(out), *ONE_STEP, *TINY]) == 0
    got = weights(out)
    want = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert "init_encoder: " in (out / "config.yaml").read_text()


def test_init_encoder_of_another_architecture_names_the_first_tensor(tmp_path, capsys) -> None:
    vit = timm.create_model(
        "vit_base_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=DEPTH, num_heads=HEADS, num_classes=0
    )
    path = tmp_path / "vit96.safetensors"
    save_file(vit.state_dict(), str(path))
    err = error_line(
        capsys, ["pretrain", "--init-encoder", str(path), "--output", str(tmp_path / "run"), *ONE_STEP, *TINY]
    )
    assert "'cls_token'" in err and "(1, 1, 96)" in err and f"(1, 1, {D})" in err


def test_init_refusals(tmp_path, capsys) -> None:
    """An encoder-only source for --init, other head counts, and --init together with --resume."""
    mae = tiny_mae(seed=9)
    enc = save_hf(mae, tmp_path / "enc", encoder_only=True)
    run = ["--output", str(tmp_path / "run"), *ONE_STEP, *TINY]
    assert "--init-encoder" in error_line(capsys, ["pretrain", "--init", str(enc), *run])
    other_heads = save_hf(tiny_mae(seed=9, num_heads=4), tmp_path / "heads")
    assert "num_heads=4" in error_line(capsys, ["pretrain", "--init", str(other_heads), *run])
    assert "--resume" in error_line(capsys, ["pretrain", "--init", str(enc), "--resume", *run])
