"""The VQ-VAE visual tokenizer: deterministic codes on the patch grid, the straight-through gradient, EMA codebook
updates and dead-code restarts, its training run (usage, perplexity, figures, exact resume), loading and recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.methods.tiny import smooth_images

from maelab.cli import main
from maelab.config import build_config
from maelab.engine.checkpoint import LAST
from maelab.errors import CheckpointError, ConfigError
from maelab.methods.tokenizer import (
    TokenizerConfig,
    VQConfig,
    VQTokenizer,
    load_tokenizer,
    tokenizer_state,
    train_tokenizer,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_VQ = dict(codebook_size=16, code_dim=8, hidden_dim=16, num_res_blocks=1)
"""A tokenizer of a few thousand parameters for 32 px images in 4 px patches (an 8 x 8 code grid)."""


def tiny_tokenizer(seed: int = 0, **cfg: Any) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(**{"img_size": 32, "patch_size": 4, **TINY_VQ, **cfg}))


def write_tokenizer(path: Path, seed: int = 0, **cfg: Any) -> Path:
    """A random tiny tokenizer saved as a tokenizer checkpoint (what :func:`load_tokenizer` reads)."""
    torch.save(tokenizer_state(tiny_tokenizer(seed, **cfg)), path)
    return path


def tiny_tokenizer_cfg(output: Path, **kw: Any) -> TokenizerConfig:
    overrides = {
        "output": str(output),
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "log_every": 1,
        "vis_every": 1,
        "data.num_samples": 32,
        "data.num_workers": 0,
        "device": "cpu",
        **TINY_VQ,
        **kw,
    }
    return build_config(TokenizerConfig, None, overrides)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_codes_lie_on_the_patch_grid_are_the_nearest_codes_and_never_change_the_codebook() -> None:
    model = tiny_tokenizer().train()  # even in training mode encode does not update the codebook
    twin = tiny_tokenizer(seed=1).eval()
    twin.load_state_dict(model.state_dict())
    imgs = smooth_images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(imgs)
    assert codes.shape == (4, 64) and codes.dtype == torch.long
    assert torch.equal(model.encode(imgs), codes) and torch.equal(twin.encode(imgs), codes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    z = model.encoder(imgs).detach().permute(0, 2, 3, 1).reshape(4, 64, -1)  # [B, L, D], row-major over the grid
    assert torch.equal(codes, torch.cdist(z, model.quantizer.embedding[None].expand(4, -1, -1)).argmin(-1))
    assert model.decode_codes(codes).shape == imgs.shape
    out = model(imgs)  # training forward: its codes are searched before the codebook's update
    assert torch.equal(out.codes, codes) and out.recon.shape == imgs.shape


def test_the_straight_through_gradient_reaches_the_encoder() -> None:
    model = tiny_tokenizer().train()
    imgs = smooth_images()
    F.mse_loss(model(imgs).recon, imgs).backward()  # reconstruction only: no commitment term
    grad = model.encoder[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert not any(b.requires_grad for b in model.quantizer.buffers())  # the codebook learns by EMA, not by grad


def test_ema_update_moves_each_used_code_to_the_mean_of_its_vectors() -> None:
    model = tiny_tokenizer(ema_decay=0.0, dead_code_threshold=0.0).train()
    imgs = smooth_images()
    z = model.encoder(imgs).detach().permute(0, 2, 3, 1).reshape(-1, TINY_VQ["code_dim"])
    codes = model(imgs).codes.flatten()
    for k in codes.unique():
        torch.testing.assert_close(model.quantizer.embedding[k], z[codes == k].mean(0), rtol=1e-3, atol=1e-5)
    assert int(model.quantizer.restarts) == 0


def test_a_dead_code_is_restarted_at_an_encoder_output_of_the_batch() -> None:
    model = tiny_tokenizer(dead_code_threshold=1.0).train()
    q = model.quantizer
    with torch.no_grad():
        q.cluster_size.fill_(100.0)  # every code recently used ...
        q.cluster_size[3] = 0.0  # ... but code 3, which is also far from every encoder output
        q.embedding[3] = 1e3
        q.embed_sum[3] = 1e3
    seen: list[torch.Tensor] = []
    model.encoder.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    codes = model(smooth_images()).codes
    assert not (codes == 3).any()
    z = seen[0].permute(0, 2, 3, 1).reshape(-1, TINY_VQ["code_dim"])
    assert (z == q.embedding[3]).all(dim=1).any()  # restarted at one of the batch's encoder outputs
    assert float(q.cluster_size[3]) == 1.0 and int(q.restarts) == 1  # the others stay (moving counts ~99)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch tokenizer training run."""
    run = tmp_path_factory.mktemp("tokenizer") / "full"
    result = train_tokenizer(tiny_tokenizer_cfg(run), progress=False)
    assert result.epoch == 2 and not result.stopped_early
    return run


def test_training_logs_usage_and_perplexity_writes_figures_and_loads_back(full_run: Path) -> None:
    records = read_metrics(full_run)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 < r["codebook_usage"] <= 1
        # exp(entropy) of the epoch's histogram: at least 1, at most the number of codes used
        assert 1 <= r["perplexity"] <= r["codebook_usage"] * TINY_VQ["codebook_size"] + 1e-6
        assert r["codes_restarted"] >= 0
    figures = sorted(p.name for p in (full_run / "figures").iterdir())
    assert figures == ["loss_curve.png", "reconstruction_epoch0001.png", "reconstruction_epoch0002.png"]
    state = torch.load(full_run / "checkpoints" / LAST, weights_only=False)
    assert state["kind"] == "tokenizer" and state["tokenizer_config"]["codebook_size"] == 16
    tokenizer = load_tokenizer(full_run)
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    imgs = smooth_images()
    assert torch.equal(load_tokenizer(full_run / "checkpoints" / LAST).encode(imgs), tokenizer.encode(imgs))


def test_resume_mid_epoch_is_bit_exact_codebook_and_histogram_included(full_run: Path, tmp_path: Path) -> None:
    part = tiny_tokenizer_cfg(tmp_path / "part")
    assert train_tokenizer(part, progress=False, max_steps=3).stopped_early  # mid-epoch 2 (2 steps per epoch)
    train_tokenizer(part, progress=False, resume=True)
    a = torch.load(full_run / "checkpoints" / LAST, weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / LAST, weights_only=False)
    for key, value in a["model"].items():  # weights, codebook, EMA counts and sums, restart counter
        assert torch.equal(value, b["model"][key]), key
    for key in ("codebook_usage", "perplexity", "codes_restarted"):
        assert read_metrics(full_run)[-1][key] == read_metrics(tmp_path / "part")[-1][key], key


def test_load_tokenizer_refuses_a_missing_path_and_other_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer not found") as err:
        load_tokenizer(tmp_path / "nope")
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"kind": "pretrain", "model": {}, "step": 1}, other)
    with pytest.raises(CheckpointError, match="a pretrain checkpoint, not a tokenizer"):
        load_tokenizer(other)
    assert isinstance(load_tokenizer(write_tokenizer(tmp_path / "tok.pt")), VQTokenizer)


def test_config_checks_the_codebook_and_takes_the_grid_from_the_preset() -> None:
    vq = build_config(TokenizerConfig, None, {"model": "mae_vit_base_patch16"}).vq_config()
    assert (vq.img_size, vq.patch_size, vq.grid_size, vq.in_chans) == (224, 16, (14, 14), 3)
    for key, value in (("codebook_size", 1), ("ema_decay", 1.0), ("beta", -0.1), ("dead_code_threshold", -1)):
        with pytest.raises(ConfigError, match=f"invalid {key}="):
            build_config(TokenizerConfig, None, {key: value})


def test_recipes_are_valid_tokenizer_configs() -> None:
    cifar = build_config(TokenizerConfig, RECIPES / "tokenizer_cifar10.yaml")
    assert cifar.vq_config().grid_size == (8, 8) and cifar.codebook_size == 512
    imagenet = build_config(TokenizerConfig, RECIPES / "tokenizer_imagenet.yaml").vq_config()
    assert imagenet.grid_size == (14, 14) and imagenet.codebook_size == 8192


def test_the_tokenizer_command_trains_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "cli"
    args = ["tokenizer", "--output", str(run), "--epochs", "1", "--batch-size", "16", "--codebook-size", "16"]
    args += ["--code-dim", "8", "--hidden-dim", "16", "data.num_samples=16", "data.num_workers=0", "--no-progress"]
    assert main(args) == 0
    assert "finished: epoch 1/1" in capsys.readouterr().out
    assert load_tokenizer(run).cfg.codebook_size == 16
