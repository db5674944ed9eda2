"""End-to-end pre-training on CPU: outputs, loss falls, exact resume, failure handling."""

import json
import math

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS

from maelab.config import PretrainConfig, build_config
from maelab.engine.checkpoint import LAST
from maelab.engine.pretrain import pretrain, pretraining_loop
from maelab.errors import CheckpointError, ConfigError, NonFiniteLossError


def tiny_cfg(output, **kw) -> PretrainConfig:
    overrides = {
        "model": "mae_vit_pico_patch4_32",
        "output": str(output),
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "data.num_samples": 64,
        "data.num_workers": 0,
        **{f"model_args.{k}": v for k, v in TINY_MODEL_ARGS.items()},
    }
    overrides.update(kw)
    return build_config(PretrainConfig, None, overrides)


def weights(path):
    return torch.load(path / "checkpoints" / LAST, weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_writes_outputs_and_loss_falls(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=6, log_every=1, **{"data.num_samples": 128, "vis_every": 3})
    result = pretrain(cfg, progress=False)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"epoch", "loss", "lr", "img_per_s"} <= set(r)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], [r["loss"] for r in records]
    # the epoch's loss is the mean of its steps' losses (steps.jsonl, one line per step here)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 49))
    last_epoch = [s["loss"] for s in steps[-8:]]
    assert records[-1]["loss"] == result.final_loss == pytest.approx(sum(last_epoch) / 8, rel=1e-6)
    assert (out / "config.yaml").is_file() and build_config(PretrainConfig, out / "config.yaml") == cfg
    assert (out / "checkpoints" / LAST).is_file()
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["loss_curve.png", "reconstruction_epoch0003.png", "reconstruction_epoch0006.png"]
    for f in (out / "figures").iterdir():
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "checkpoints" / LAST, weights_only=False)
    assert {"model", "optimizer", "scaler", "step", "epoch", "rng", "mask_gen", "config", "model_config"} <= set(state)
    assert {"kind", "rng_ranks", "best", "last_eval"} <= set(state) and state["kind"] == "pretrain"
    assert state["step"] == 6 * (128 // 16) and "cls_token" in state["model"]


@pytest.mark.parametrize("accum", [1, pytest.param(2, marks=pytest.mark.slow)])  # accum: tests/engine/test_loop.py
def test_resume_mid_epoch_gives_identical_weights(tmp_path, accum):
    full = tiny_cfg(tmp_path / "full", accum_steps=accum, log_every=1)
    pretrain(full, progress=False)
    part = tiny_cfg(tmp_path / "part", accum_steps=accum, log_every=1)
    stopped = pretrain(part, progress=False, max_steps=3)  # epoch has 4 / accum steps: stops mid-epoch
    assert stopped.stopped_early and stopped.step == 3
    resumed = pretrain(part, resume=True, progress=False)
    assert resumed.epoch == 2 and not resumed.stopped_early
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))
    recs_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    recs_part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in recs_full] == pytest.approx([json.loads(r)["loss"] for r in recs_part])
    # steps.jsonl: one record per step (log_every=1), none lost or doubled by the stop and resume
    steps_full, steps_part = (
        [json.loads(r) for r in (tmp_path / d / "steps.jsonl").read_text().splitlines()] for d in ("full", "part")
    )
    assert [r["step"] for r in steps_full] == [r["step"] for r in steps_part] == list(range(1, 8 // accum + 1))
    assert [r["loss"] for r in steps_full] == pytest.approx([r["loss"] for r in steps_part])


def test_resume_falls_back_when_last_is_corrupt(tmp_path):
    full = tiny_cfg(tmp_path / "full", epochs=3)
    pretrain(full, progress=False)
    part = tiny_cfg(tmp_path / "part", epochs=3, save_every_steps=2)
    pretrain(part, progress=False, max_steps=7)
    ckpts = tmp_path / "part" / "checkpoints"
    assert (ckpts / "step_00000006.pt").exists()
    (ckpts / LAST).write_bytes((ckpts / LAST).read_bytes()[:1000])  # crash left a truncated file
    pretrain(part, resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_periodic_checkpoint_is_serialized_once_and_rotation_keeps_last(tmp_path, monkeypatch):
    """A periodic save writes ``last.pt`` once and gives it the periodic name too; rotating that name away
    (keep_last=1) or writing the next ``last.pt`` leaves every other name's data intact."""
    loop = pretraining_loop(tiny_cfg(tmp_path / "run", keep_last=1), progress=False)
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: (saves.append(f), real_save(obj, f, *a, **kw)))
    ckpts = loop.ckpt_dir
    for step in (3, 7):
        loop.step = step
        loop.save(0, periodic=f"epoch_{step:04d}.pt")
    assert len(saves) == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0007.pt", LAST]
    last, periodic = (torch.load(ckpts / name, weights_only=False) for name in (LAST, "epoch_0007.pt"))
    assert last["step"] == periodic["step"] == 7
    assert_same_weights(last["model"], periodic["model"])
    loop.step = 8
    loop.save(0)
    assert torch.load(ckpts / LAST, weights_only=False)["step"] == 8
    assert torch.load(ckpts / "epoch_0007.pt", weights_only=False)["step"] == 7


def test_existing_run_needs_resume_and_matching_model(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    pretrain(cfg, progress=False, max_steps=1)
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(cfg, progress=False)
    other = tiny_cfg(tmp_path / "run", **{"model_args.depth": 3})
    with pytest.raises(CheckpointError, match="depth: 2 -> 3"):
        pretrain(other, resume=True, progress=False)


def test_resume_needs_the_same_weight_decay_on_tokens(tmp_path):
    """weight_decay_tokens changes the optimizer's groups: a run continues only with the value it used."""
    old = tiny_cfg(tmp_path / "run", weight_decay_tokens=False)
    pretrain(old, progress=False, max_steps=1)
    with pytest.raises(CheckpointError, match="weight_decay_tokens=false"):
        pretrain(tiny_cfg(tmp_path / "run"), resume=True, progress=False, max_steps=2)
    assert pretrain(old, resume=True, progress=False, max_steps=2).step == 2


class PoisonedStep:
    """A TrainStep whose ``bad_call``-th step (1-based) returns a NaN loss; everything else is the real step's."""

    def __init__(self, step, bad_call: int) -> None:
        self.step, self.bad_call, self.calls = step, bad_call, 0

    def __call__(self, batches, lr):
        self.calls += 1
        loss = self.step(batches, lr)
        return loss * float("nan") if self.calls == self.bad_call else loss

    def __getattr__(self, name):
        return getattr(self.step, name)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=3)
    loop = pretraining_loop(cfg, progress=False)
    loop.p.step_fn = PoisonedStep(loop.p.step_fn, bad_call=6)  # type: ignore[assignment]
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        loop.run()
    state = torch.load(tmp_path / "run" / "checkpoints" / LAST, weights_only=False)
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_norm_pix_and_block_masking_train(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=1, **{"model_args.norm_pix_loss": True, "model_args.mask_type": "block"})
    result = pretrain(cfg, progress=False)
    assert result.step == 4 and torch.isfinite(torch.tensor(result.final_loss))


def test_real_cifar10_folder(tmp_path, cifar10_dir):
    # A short CPU run on real JPEGs (50k train images are indexed, a few batches trained).
    cfg = tiny_cfg(tmp_path / "run", epochs=1, **{"data.name": str(cifar10_dir / "train")})
    result = pretrain(cfg, progress=False, max_steps=3)
    assert result.step == 3 and torch.isfinite(torch.tensor(result.final_loss))
    assert (tmp_path / "run" / "checkpoints" / LAST).exists()


def _poison_forward(loop, bad_calls):
    """Make the model's forward return a NaN loss on the given (1-based) calls."""
    from maelab.models.mae import MAEOutput

    real = loop.p.step_fn.forward
    calls = {"n": 0}

    def forward(imgs, noise=None):
        calls["n"] += 1
        out = real(imgs, noise=noise)
        return MAEOutput(out.loss * float("nan"), out.pred, out.mask) if calls["n"] in bad_calls else out

    loop.p.step_fn.forward = forward


def test_max_bad_steps_skips_non_finite_updates(tmp_path):
    loop = pretraining_loop(tiny_cfg(tmp_path / "run", max_bad_steps=1), progress=False)
    _poison_forward(loop, {3})
    result = loop.run()
    assert result.epoch == 2 and loop.bad_steps == 1 and math.isfinite(result.final_loss)
    state = torch.load(tmp_path / "run" / "checkpoints" / LAST, weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    loop = pretraining_loop(tiny_cfg(tmp_path / "run2", max_bad_steps=1), progress=False)
    _poison_forward(loop, {2, 6})
    with pytest.raises(NonFiniteLossError):
        loop.run()


def test_online_knn_monitoring_is_logged(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=2, knn_every=1, knn_k=5, **{"data.num_classes": 4})
    pretrain(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in records) and len(records) == 2


def test_online_knn_refuses_the_training_folder_as_validation(tmp_path, cifar10_dir):
    cfg = tiny_cfg(tmp_path / "run", knn_every=1, **{"data.name": str(cifar10_dir / "train")})
    with pytest.raises(ConfigError, match="knn_data"):
        pretraining_loop(cfg, progress=False)


def test_hog_target_run_writes_curve_and_its_hog_figure(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=1, **{"model_args.target": "hog"})
    result = pretrain(cfg, progress=False)
    assert math.isfinite(result.final_loss)
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert figures == ["loss_curve.png", "reconstruction_epoch0001.png"]  # HOG orientations: maelab.viz.hog


def test_training_set_is_built_once_and_vis_batch_uses_eval_transform(tmp_path, monkeypatch):
    """The reconstruction batch is read from the training set with the evaluation transform
    swapped in: the same images a separately built evaluation set gives, without a second build."""
    import maelab.data.pipeline as pipeline
    from maelab.data import build_dataset, eval_transform

    calls = []
    monkeypatch.setattr(pipeline, "build_dataset", lambda *a, **k: calls.append(1) or build_dataset(*a, **k))
    cfg = tiny_cfg(tmp_path / "run")
    p = pretraining_loop(cfg, progress=False).p
    assert len(calls) == 1
    fresh = build_dataset(
        cfg.data,
        img_size=32,
        in_chans=3,
        train=True,
        seed=cfg.seed,
        transform=eval_transform(32, p.mean, p.std, cfg.data.crop_pct),
    )
    imgs, _ = p.vis_batch
    step = len(fresh) // imgs.shape[0]
    assert torch.equal(imgs, torch.stack([fresh[i * step][0] for i in range(imgs.shape[0])]))
    # the training transform is back: random uint8 crops for the loader
    assert p.data.dataset[0][0].dtype == torch.uint8


def test_step_log_records_the_mean_loss_of_each_interval(tmp_path):
    """steps.jsonl: one record per log_every steps, whose loss is the mean of those steps' losses."""
    every = tiny_cfg(tmp_path / "every", epochs=1, log_every=1, **{"data.num_samples": 128})
    pretrain(every, progress=False)
    fours = tiny_cfg(tmp_path / "fours", epochs=1, log_every=4, **{"data.num_samples": 128})
    pretrain(fours, progress=False)
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "steps.jsonl").read_text().splitlines()]  # noqa: E731
    per_step, per_four = read("every"), read("fours")
    assert [r["step"] for r in per_step] == list(range(1, 9)) and [r["step"] for r in per_four] == [4, 8]
    for rec, first in zip(per_four, (0, 4)):
        assert rec["loss"] == pytest.approx(sum(r["loss"] for r in per_step[first : first + 4]) / 4, rel=1e-5)
