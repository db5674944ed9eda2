"""The one training loop (``maelab.engine.loop.Loop``) with a tiny fake protocol: a linear model on random
tensors, on the CPU. Accumulation, exact mid-epoch resume, ``best.pt``, periodic checkpoint rotation, the
finite-loss policy and the epoch hooks of a resumed run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from maelab.engine.checkpoint import LAST
from maelab.engine.loop import BEST, Loop, Protocol, RunContext, start_run
from maelab.engine.step import TrainStep
from maelab.errors import NonFiniteLossError

SAMPLES = 64
FEATURES = 4


@dataclass
class LoopConfig:
    """The fields the loop reads from a training config."""

    output: str
    epochs: int = 2
    batch_size: int = 8
    accum_steps: int = 1
    lr: float = 0.05
    warmup_epochs: float = 0.5
    min_lr: float = 0.0
    log_every: int = 1
    save_every: int = 1
    save_every_steps: int = 0
    keep_last: int = 0
    max_bad_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    tensorboard: bool = False

    def effective_batch(self, world: int) -> int:
        return self.batch_size * self.accum_steps * world

    def resolved_lr(self, world: int) -> float:
        return self.lr


class LinearProtocol(Protocol):
    """Regression of fixed random targets with a Linear(4, 1) and SGD with momentum (its state matters on resume).

    Each epoch visits the samples in an order drawn from the epoch number; ``noisy``: the loss adds noise from the
    global torch RNG to the targets (so a resume must restore that RNG). ``evals``: what :meth:`evaluate` returns
    at epochs 1, 2, ... (as ``{"score": value}``); ``bad_calls``: loss-function calls (1-based) whose loss is NaN.
    """

    kind = "linear"
    best_metric = "score"

    def __init__(
        self,
        ctx: RunContext,
        noisy: bool = True,
        evals: Sequence[float] = (),
        bad_calls: Sequence[int] = (),
    ) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        data = torch.Generator().manual_seed(123)  # the same data in every run
        self.x = torch.randn(SAMPLES, FEATURES, generator=data)
        self.y = self.x @ torch.randn(FEATURES, 1, generator=data) + 0.1 * torch.randn(SAMPLES, 1, generator=data)
        self.model = torch.nn.Linear(FEATURES, 1)  # initialized from the RNGs start_run seeded
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=0.9)
        self.step_fn = TrainStep(
            self.model, self.loss, self.optimizer, ctx.device, ctx.dtype, skip_nonfinite=cfg.max_bad_steps > 0
        )
        self.batches_per_epoch = SAMPLES // cfg.batch_size
        self.noisy = noisy
        self.evals = list(evals)
        self.bad_calls = set(bad_calls)
        self.calls = 0
        self.started: list[int] = []
        self.evaluated: dict[int, dict[str, torch.Tensor]] = {}  # epoch -> weights when it was evaluated
        self.on_loss: Callable[[int], None] | None = None

    def loss(self, forward: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.on_loss is not None:
            self.on_loss(self.calls)
        x, y = batch
        if self.noisy:
            y = y + 0.01 * torch.randn(y.shape)
        loss = F.mse_loss(forward(x), y)
        return loss * float("nan") if self.calls in self.bad_calls else loss

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(1000 + epoch))
        bs = self.ctx.cfg.batch_size
        for i in range(start_batch, self.batches_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            yield self.x[idx], self.y[idx]

    def start_epoch(self, epoch: int) -> None:
        self.started.append(epoch)

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        if not self.evals:
            return {}
        self.evaluated[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"score": self.evals[epoch - 1]}


def make_loop(output: Path, resume: bool = False, **kw: Any) -> Loop:
    """A loop over :class:`LinearProtocol`; ``kw``: LoopConfig fields, or LinearProtocol's options."""
    options = {k: kw.pop(k) for k in ("noisy", "evals", "bad_calls") if k in kw}
    cfg = LoopConfig(output=str(output), **kw)
    return Loop(LinearProtocol(start_run(cfg, LinearProtocol.kind, resume=resume, progress=False), **options))


def weights(loop: Loop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.p.model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def test_two_micro_batches_of_4_make_the_step_of_one_batch_of_8(tmp_path):
    """accum_steps=2 with batches of 4 trains the weights that batches of 8 do: the same steps, lr and updates."""
    whole = make_loop(tmp_path / "whole", batch_size=8, noisy=False)
    halves = make_loop(tmp_path / "halves", batch_size=4, accum_steps=2, noisy=False)
    assert whole.steps_per_epoch == halves.steps_per_epoch == 8
    start = weights(whole)
    assert_identical(start, weights(halves))  # the same init (seeded alike)
    a, b = whole.run(), halves.run()
    assert a.step == b.step == 16
    assert not torch.equal(weights(whole)["weight"], start["weight"])
    for k, v in weights(whole).items():
        torch.testing.assert_close(weights(halves)[k], v, rtol=0, atol=1e-6)
    assert b.final_loss == pytest.approx(a.final_loss, abs=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_run_stopped_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, accum):
    """max_steps stops in the middle of epoch 1 with a checkpoint; --resume continues it bit for bit (data position,
    optimizer momentum, the global RNG the loss draws from, lr schedule)."""
    full = make_loop(tmp_path / "full", accum_steps=accum)
    full.run()
    part = make_loop(tmp_path / "part", accum_steps=accum)
    stopped = part.run(max_steps=5 // accum)
    assert stopped.stopped_early and stopped.epoch == 0 and stopped.step == 5 // accum
    assert load(tmp_path / "part" / "checkpoints" / LAST)["batch_in_epoch"] == accum * (5 // accum)
    resumed = make_loop(tmp_path / "part", resume=True, accum_steps=accum)
    assert resumed.step == 5 // accum and resumed.epoch == 0
    result = resumed.run()
    assert result.step == full.step == 2 * 8 // accum and not result.stopped_early
    assert_identical(weights(full), weights(resumed))
    losses = [
        [json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("full", "part")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)


def test_start_epoch_is_not_called_for_the_resumed_part_of_an_epoch(tmp_path):
    first = make_loop(tmp_path / "run", epochs=3)
    first.run(max_steps=5)  # in epoch 0 (8 steps per epoch)
    assert first.p.started == [0]
    resumed = make_loop(tmp_path / "run", resume=True, epochs=3)
    resumed.run()
    assert resumed.p.started == [1, 2]


def test_best_checkpoint_follows_the_best_metric(tmp_path):
    """best.pt holds the weights of the epoch with the highest ``score`` so far, without the optimizer."""
    scores = [0.3, 0.7, 0.5, 0.9, 0.2]
    loop = make_loop(tmp_path / "run", epochs=5, evals=scores)
    seen: list[int] = []
    real_end = loop.p.end_of_epoch

    def note_best(epoch: int, final: bool) -> None:
        seen.append(load(loop.ckpt_dir / BEST)["epoch"])
        real_end(epoch, final)

    loop.p.end_of_epoch = note_best  # type: ignore[method-assign]
    result = loop.run()
    assert seen == [1, 2, 2, 4, 4]
    best = load(loop.ckpt_dir / BEST)
    assert best["epoch"] == 4 and best["best"] == {"value": 0.9, "epoch": 4} and "optimizer" not in best
    assert_identical(best["model"], loop.p.evaluated[4])
    assert not torch.equal(best["model"]["weight"], loop.p.evaluated[5]["weight"])  # the last epoch moved on
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["score"] for r in records] == scores
    assert [r["best_score"] for r in records] == [0.3, 0.7, 0.7, 0.9, 0.9]
    assert result.metrics["best_score"] == 0.9 and result.metrics["best_epoch"] == 4
    assert load(loop.ckpt_dir / LAST)["best"] == {"value": 0.9, "epoch": 4}


def test_periodic_checkpoints_rotate_to_keep_last(tmp_path):
    """save_every=1, keep_last=2 over 4 epochs: the last two periodic checkpoints (the final epoch writes only
    last.pt), each the last.pt of its epoch; keep_last=0 keeps none."""
    loop = make_loop(tmp_path / "run", epochs=4, keep_last=2)
    loop.run()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0002.pt", "epoch_0003.pt", LAST]
    assert [load(ckpts / f"epoch_000{e}.pt")["step"] for e in (2, 3)] == [16, 24]
    assert load(ckpts / LAST)["step"] == 32

    steps = make_loop(tmp_path / "steps", epochs=1, keep_last=2, save_every_steps=2)
    steps.run()
    names = sorted(p.name for p in (tmp_path / "steps" / "checkpoints").iterdir())
    assert names == [LAST, "step_00000004.pt", "step_00000006.pt"]

    none = make_loop(tmp_path / "none", epochs=3, keep_last=0, save_every_steps=2)
    none.run()
    assert [p.name for p in (tmp_path / "none" / "checkpoints").iterdir()] == [LAST]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    loop = make_loop(tmp_path / "run", bad_calls=[11])  # step 11: in epoch 2
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 11"):
        loop.run()
    state = load(tmp_path / "run" / "checkpoints" / LAST)
    assert state["epoch"] == 1 and state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_max_bad_steps_skips_one_non_finite_step_and_stops_at_the_next(tmp_path):
    loop = make_loop(tmp_path / "run", max_bad_steps=1, bad_calls=[3])
    before: dict[str, torch.Tensor] = {}

    def check(call: int) -> None:  # the forward of step 4 sees the weights the skipped step 3 saw
        if call == 3:
            before.update(weights(loop))
        elif call == 4:
            assert_identical(before, weights(loop))

    loop.p.on_loss = check
    result = loop.run()
    assert loop.bad_steps == 1 and result.step == 16 and not result.stopped_early and before
    assert math.isfinite(result.final_loss)
    assert all(torch.isfinite(v).all() for v in weights(loop).values())
    assert load(tmp_path / "run" / "checkpoints" / LAST)["bad_steps"] == 1

    two = make_loop(tmp_path / "two", max_bad_steps=1, bad_calls=[3, 9])
    with pytest.raises(NonFiniteLossError):
        two.run()
    assert two.bad_steps == 2
