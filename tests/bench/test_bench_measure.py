"""Benchmark helpers and the Hugging Face reference model."""

from __future__ import annotations

import math

import pytest
import torch

from maelab.bench import (
    count_flops,
    environment_info,
    measure_matmul_peak,
    peak_memory,
    reset_peak_memory,
    summarize,
    time_steps,
)
from maelab.bench.hf_reference import build_hf_mae, hf_available, hf_loss
from maelab.config import ModelConfig

CPU = torch.device("cpu")


def test_time_steps_cpu():
    calls = []
    times = time_steps(lambda: calls.append(sum(range(1000))), warmup=2, iters=5, device=CPU)
    assert len(calls) == 7
    assert len(times) == 5
    assert all(t > 0 for t in times)
    with pytest.raises(ValueError):
        time_steps(lambda: None, warmup=0, iters=0, device=CPU)


def test_summarize_math():
    s = summarize([10.0, 20.0, 30.0, 40.0, 50.0], batch_size=8)
    assert s["step_ms_median"] == 30.0
    assert s["step_ms_p10"] == pytest.approx(14.0)  # numpy linear interpolation
    assert s["step_ms_p90"] == pytest.approx(46.0)
    assert s["img_per_s"] == pytest.approx(8 / 0.030)
    assert summarize([4.0, 2.0], 1)["step_ms_median"] == 3.0
    with pytest.raises(ValueError):
        summarize([], 1)


def test_count_flops_linear():
    lin = torch.nn.Linear(64, 128)
    x = torch.randn(32, 64)
    assert count_flops(lambda: lin(x)) == 2 * 32 * 64 * 128
    # backward adds the two gradient matmuls (input and weight)
    x.requires_grad_(True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 32 * 64 * 128


def test_matmul_peak_cpu():
    flops = measure_matmul_peak(CPU, dtype=torch.float32, n=128, iters=2, warmup=1)
    assert math.isfinite(flops) and flops > 0


def test_peak_memory_cpu():
    reset_peak_memory(CPU)
    before = peak_memory(CPU)
    assert before > 0
    buf = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory(CPU)
    del buf
    assert after >= before


def test_environment_info():
    info = environment_info(CPU)
    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu"
    assert info["python"]
    assert "git_commit" in info and (info["git_commit"] is None or isinstance(info["git_commit"], str))
    assert "transformers" in info and "cuda" in info and "cudnn" in info


def _block_params(d: int, hidden: int) -> int:
    """Pre-norm ViT block: 2 LayerNorms, qkv (bias), proj, fc1, fc2."""
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def _mae_params(cfg: ModelConfig) -> int:
    """Parameter count of the official MAE architecture (fixed pos embeds included)."""
    e, dd, p, c, n = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size, cfg.in_chans, cfg.num_patches
    enc = (c * p * p * e + e) + e + (n + 1) * e + cfg.depth * _block_params(e, int(e * cfg.mlp_ratio)) + 2 * e
    dec = (e * dd + dd) + dd + (n + 1) * dd + cfg.decoder_depth * _block_params(dd, int(dd * cfg.mlp_ratio))
    dec += 2 * dd + (dd * p * p * c + p * p * c)
    return enc + dec


TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
@pytest.mark.parametrize("norm_pix", [False, True])
def test_hf_reference_tiny(norm_pix):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, norm_pix_loss=norm_pix)
    model = build_hf_mae(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    expected = _mae_params(cfg)
    assert abs(n_params - expected) <= 0.02 * expected, (n_params, expected)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, cfg.num_patches)
    loss = hf_loss(model, imgs, noise=noise)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the same noise gives the same mask, hence the same loss
    with torch.no_grad():
        assert torch.equal(hf_loss(model, imgs, noise=noise), hf_loss(model, imgs, noise=noise))


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
def test_hf_reference_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        build_hf_mae(ModelConfig(**{**TINY, "img_size": (32, 48)}))


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
def test_hf_reference_pos_embed_initialized():
    from maelab.models.pos_embed import sincos_2d

    model = build_hf_mae(ModelConfig(**TINY))
    expected = sincos_2d(64, (8, 8), cls_token=True)
    torch.testing.assert_close(model.vit.embeddings.position_embeddings[0], expected)
    assert model.decoder.decoder_pos_embed.abs().sum() > 0
    assert model.decoder.mask_token.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_memory_and_peak():
    dev = torch.device("cuda")
    x = torch.randn(1024, 1024, device=dev)
    times = time_steps(lambda: x @ x, warmup=2, iters=5, device=dev)
    assert len(times) == 5 and all(t > 0 for t in times)
    reset_peak_memory(dev)
    y = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    assert peak_memory(dev) >= 64 * 2**20
    del y
    assert measure_matmul_peak(dev, n=2048, iters=3) > 1e12
    info = environment_info(dev)
    assert info["device_name"] and info["cuda"]
