"""The torch.compile path computes what the eager path computes (CPU inductor)."""

import pytest
import torch

import maelab
from maelab.engine.optim import build_adamw
from maelab.engine.step import TrainStep
from tests.conftest import TINY_MODEL_ARGS, assert_weights_close


@pytest.mark.slow
def test_compiled_train_steps_match_eager():
    torch.manual_seed(0)
    eager = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    compiled = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    compiled.load_state_dict(eager.state_dict())
    imgs = torch.randn(8, 3, 32, 32)
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = build_adamw(model, lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        fwd = torch.compile(model) if name == "compiled" else model
        step = TrainStep(model, opt, torch.device("cpu"), torch.float32, generator=gen, forward=fwd)
        losses[name] = [step([imgs], 1e-3).item() for _ in range(3)]
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-4)
    assert_weights_close(eager.state_dict(), compiled.state_dict(), rtol=1e-3, atol=1e-5)
