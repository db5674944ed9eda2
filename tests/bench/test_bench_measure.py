"""Benchmark helpers and the Hugging Face reference model."""

from __future__ import annotations

import math
import sys

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
from maelab.models.masking import masking_from_noise
from maelab.models.patches import patchify

CPU = torch.device("cpu")


def test_time_steps_cpu():
    calls = []
    times = time_steps(lambda: calls.append(sum(range(1000))), warmup=2, iters=5, device=CPU)
    assert len(calls) == 7
    assert len(times) == 5
    assert all(t > 0 for t in times)
    with pytest.raises(ValueError):
        time_steps(lambda: None, warmup=0, iters=0, device=CPU)


def test_time_steps_records_and_waits_on_the_requested_cuda_device(monkeypatch):
    """``--device cuda:1``: the events are recorded with cuda:1 current (its stream, where the
    step's kernels run) and the host waits for cuda:1, not for the default cuda:0 (fake CUDA)."""
    current = [0]
    log: list[tuple[str, int]] = []

    class FakeDevice:
        def __init__(self, device: torch.device) -> None:
            self.index = torch.device(device).index

        def __enter__(self) -> None:
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc: object) -> None:
            current[0] = self.prev

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream: object = None) -> None:
            log.append(("record", current[0]))

        def elapsed_time(self, other: FakeEvent) -> float:
            return 1.0

    def fake_sync(device: torch.device | None = None) -> None:
        log.append(("sync", current[0] if device is None else torch.device(device).index))

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", fake_sync)
    steps: list[int] = []
    times = time_steps(lambda: steps.append(current[0]), warmup=1, iters=2, device="cuda:1")
    assert times == [1.0, 1.0] and steps[1:] == [1, 1]
    assert log == [("sync", 1)] + [("record", 1)] * 4 + [("sync", 1)]


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


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU peak resets only on Linux (/proc/self/clear_refs)")
def test_peak_memory_cpu_resets_and_counts_a_touched_buffer():
    old_peak = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched, then freed: a peak the reset must forget
    del old_peak
    reset_peak_memory(CPU)
    before = peak_memory(CPU)
    buf = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory(CPU)
    del buf
    assert after - before >= 60 * 2**20, (before, after)  # without the reset the old peak would hide it


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


TINY = dict(
    img_size=32,
    patch_size=4,
    embed_dim=64,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)


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
    # the loss is the MSE over the patches the noise hides (largest noise), computed here by hand
    with torch.no_grad():
        pred = model(pixel_values=imgs, noise=noise).logits  # [B, L, p*p*C]
        target = patchify(imgs, cfg.patch_size)
        if norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        hidden = masking_from_noise(noise, cfg.mask_ratio).mask
        expected = ((pred - target) ** 2).mean(-1)[hidden].mean()
        torch.testing.assert_close(hf_loss(model, imgs, noise=noise), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(hf_loss(model, imgs, noise=noise), hf_loss(model, imgs, noise=1 - noise))


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
def test_hf_reference_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        build_hf_mae(ModelConfig(**{**TINY, "img_size": (32, 48)}))


@pytest.mark.skipif(not hf_available(), reason="transformers not installed")
def test_hf_reference_pos_embed_initialized():
    """The tables equal an independent numpy port of the official code (transformers 5 leaves them zero)."""
    from tests.models.test_pos_embed import official_2d

    model = build_hf_mae(ModelConfig(**TINY))
    for table, dim in ((model.vit.embeddings.position_embeddings, 64), (model.decoder.decoder_pos_embed, 32)):
        expected = torch.from_numpy(official_2d(dim, 8, cls_token=True)).float()
        torch.testing.assert_close(table.detach()[0], expected, atol=1e-6, rtol=0)
    assert model.decoder.mask_token.std().item() == pytest.approx(0.02, rel=0.5)


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
