"""TrainStep: gradient accumulation, gradient clipping and fp16 with a GradScaler, checked on the
gradients the optimizer actually receives (CPU, fp32 unless stated)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS

import maelab
from maelab.methods import pretrain_step

CPU = torch.device("cpu")


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients of each step it takes: ``seen[k]`` [tensors]."""

    def __init__(self, params, lr: float = 0.0) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # noqa: D102
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def step_grads(
    batches: list[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """The gradients one TrainStep over ``batches`` hands to the optimizer (same init and noise seed each call)."""
    torch.manual_seed(0)
    model = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    opt = RecordingSGD([p for p in model.parameters() if p.requires_grad])
    step = pretrain_step(
        model, opt, CPU, dtype, scaler=scaler, grad_clip=grad_clip, generator=torch.Generator().manual_seed(1)
    )
    step(batches, 0.0)
    return opt.seen[0] if opt.seen else [], model


def global_norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


IMGS = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_accumulating_two_micro_batches_gives_the_gradient_of_the_double_batch():
    """accum_steps=2 over two halves == one batch of 16 (the noise of 2 x 8 rows is the noise of 16 rows)."""
    whole, _ = step_grads([IMGS])
    halves, _ = step_grads([IMGS[:8], IMGS[8:]])
    assert len(whole) == len(halves) > 0
    for a, b in zip(whole, halves):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_gradient_clipping_scales_the_global_norm_down_to_the_limit():
    plain, _ = step_grads([IMGS])
    norm = global_norm(plain)
    clipped, _ = step_grads([IMGS], grad_clip=norm / 10)
    assert global_norm(clipped) == pytest.approx(norm / 10, rel=1e-4)
    for a, b in zip(plain, clipped):  # the same direction: every gradient scaled by the same factor
        torch.testing.assert_close(b, a / 10, rtol=1e-4, atol=1e-9)
    loose, _ = step_grads([IMGS], grad_clip=norm * 10)
    for a, b in zip(plain, loose):
        assert torch.equal(a, b)


def test_fp16_gradscaler_unscales_before_clipping_and_skips_overflowing_steps():
    """fp16 autocast with a GradScaler (CPU autocast here): the optimizer sees fp32-sized gradients,
    clipped after unscaling, and a step whose scaled gradients overflow is skipped and halves the scale."""
    plain, _ = step_grads([IMGS])
    half, _ = step_grads([IMGS], dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in half]), torch.cat([g.flatten() for g in plain]), dim=0
    )
    assert global_norm(half) == pytest.approx(global_norm(plain), rel=0.05) and cos > 0.99
    limit = global_norm(plain) / 10
    clipped, _ = step_grads(
        [IMGS], dtype=torch.float16, grad_clip=limit, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)
    )
    assert global_norm(clipped) == pytest.approx(limit, rel=1e-3)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # the scaled fp16 gradients overflow
    skipped, _ = step_grads([IMGS], dtype=torch.float16, scaler=scaler)
    assert skipped == [] and scaler.get_scale() == 2.0**119
