"""The torch.compile path computes what the eager path computes (CPU inductor)."""

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS, assert_weights_close

import maelab
from maelab.engine.accel import compile_module
from maelab.engine.optim import build_adamw
from maelab.methods import pretrain_step


def test_compiled_train_steps_match_eager():
    """The default CUDA path compiles the model (engine.accel.compile_module); on CPU inductor the
    compiled steps give the eager losses and weights (fused kernels round differently: 1e-4)."""
    torch.manual_seed(0)
    eager = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    compiled = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    compiled.load_state_dict(eager.state_dict())
    imgs = torch.randn(8, 3, 32, 32)
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = build_adamw(model, lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        fwd = compile_module(model) if name == "compiled" else model
        step = pretrain_step(model, opt, torch.device("cpu"), torch.float32, generator=gen, forward=fwd)
        losses[name] = [step([imgs], 1e-3).item() for _ in range(3)]
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-4)
    assert_weights_close(eager.state_dict(), compiled.state_dict(), rtol=1e-3, atol=1e-5)


def test_bf16_autocast_loss_matches_fp32_within_bf16_tolerance():
    """The default CUDA precision path (bf16 autocast) computes the fp32 loss up to bf16 rounding (CPU autocast)."""
    from maelab.engine.runtime import autocast

    torch.manual_seed(0)
    model = maelab.create_model("mae_vit_pico_patch4_32", norm_pix_loss=True, **TINY_MODEL_ARGS)
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    with torch.no_grad():
        fp32 = model(imgs, noise=noise)
        with autocast(torch.device("cpu"), torch.bfloat16):
            bf16 = model(imgs, noise=noise)
    assert bf16.loss.dtype == torch.float32  # the loss is reduced in fp32
    assert torch.equal(bf16.mask, fp32.mask)
    rel = ((bf16.pred.float() - fp32.pred).norm() / fp32.pred.norm()).item()
    assert rel < 2e-2, rel  # bf16 operands: 1e-3 .. 1e-2 relative error expected
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=2e-2)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"norm_pix_loss": True},
        {"target": "hog"},
        {"mask_token_in_encoder": True},
        {"grad_checkpointing": True},
        {"mask_type": "grid"},
        "fp8",
    ],
)
def test_model_forward_compiles_to_one_graph(variant):
    """No graph breaks: the whole forward (masking, encoder, decoder, loss) is one graph, so
    inductor can fuse across it and CUDA graphs can replay it (a break would silently cost both)."""
    kw = {} if variant == "fp8" else variant
    model = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS, **kw)
    if variant == "fp8":
        pytest.importorskip("torchao")
        from maelab.engine.accel import convert_to_fp8

        convert_to_fp8(model, "tensorwise", torch.device("cpu"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32), noise=torch.rand(4, 64))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
