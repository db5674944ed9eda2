"""End-to-end tests of ``maelab finetune | linprobe | knn`` on tiny models and synthetic data (CPU).

The encoder is a randomly initialized tiny MAE (2 blocks, 64 dims): its frozen features
already separate the synthetic shapes somewhat, so kNN and the linear probe must land
clearly above chance (25 % for 4 classes); fine-tuning must lower its training loss and
beat chance too. The runs are kept to seconds, so the margins asserted are modest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import error_line, random_mae, save_mae

from maelab import cli
from maelab.config import DataConfig
from maelab.data import eval_transform
from maelab.engine.checkpoint import atomic_save, load_pretrained
from maelab.engine.loop import Loop, start_run
from maelab.eval.config import FinetuneConfig, LinprobeConfig
from maelab.eval.finetune import Finetuning
from maelab.eval.knn import knn_monitor
from maelab.eval.linprobe import LinearProbing
from maelab.models.weights import export_encoder

TINY = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 1,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}
CHANCE = 25.0  # 4 classes


def run_cli(argv: list[str]) -> int:
    """``maelab <argv>`` through the real entry point, in this interpreter."""
    return cli.main(argv)


def synth(n: int, classes: int = 4) -> list[str]:
    return [
        "--data",
        "synthetic",
        f"data.num_samples={n}",
        f"data.num_classes={classes}",
        "--num-workers",
        "0",
        "data.crop_pct=1.0",
        "--no-progress",
    ]


def read_eval(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def finetune_loop(cfg: FinetuneConfig) -> Loop:
    """A fine-tune built on the one loop, not run yet (``loop.p``: the :class:`Finetuning` protocol)."""
    return Loop(Finetuning(start_run(cfg, "finetune", progress=False)))


def probe_loop(cfg: LinprobeConfig) -> Loop:
    """A linear probe built on the one loop, not run yet (``loop.p``: the :class:`LinearProbing` protocol)."""
    return Loop(LinearProbing(start_run(cfg, "linprobe", overwrite=True, progress=False)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One random-init tiny MAE as every input users hold: run dir, .pt, official .pth, .safetensors."""
    root = tmp_path_factory.mktemp("ckpt")
    mae = random_mae(**TINY)
    pt = save_mae(mae, root / "mae.pt")
    run = root / "run"
    save_mae(mae, run / "checkpoints" / "last.pt")
    official = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    pth = atomic_save({"model": official}, root / "mae_pretrain_tiny.pth")
    st = export_encoder(mae, root / "encoder.safetensors")
    return {"pt": pt, "run": run, "pth": pth, "safetensors": st}


# ---------------------------------------------------------------------------------- kNN
def test_knn_end_to_end_from_every_checkpoint_kind(ckpts, tmp_path):
    top1 = {}
    for kind, path in ckpts.items():
        out = tmp_path / kind
        assert run_cli(["knn", "--checkpoint", str(path), "--output", str(out)] + synth(256)) == 0
        ev = read_eval(out)
        assert ev["protocol"] == "knn" and ev["metrics"]["k"] == 20 and ev["metrics"]["temperature"] == 0.07
        assert ev["num_classes"] == 4 and ev["num_test"] == 64 and ev["checkpoint"] == str(path.resolve())
        top1[kind] = ev["metrics"]["top1"]
    assert len(set(top1.values())) == 1, top1  # the same encoder, whatever the file


def test_knn_lands_above_chance(ckpts, tmp_path):
    out = tmp_path / "knn"
    assert run_cli(["knn", "--checkpoint", str(ckpts["pt"]), "--output", str(out)] + synth(1024)) == 0
    assert read_eval(out)["metrics"]["top1"] > CHANCE + 10


def test_knn_monitor_returns_top1_and_keeps_train_mode(ckpts):
    mae = load_pretrained(ckpts["pt"])
    mae.train()
    tf = eval_transform(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    from maelab.data import SyntheticShapes

    train_ds = SyntheticShapes(256, 32, 3, 4, seed=0, transform=tf)
    val_ds = SyntheticShapes(64, 32, 3, 4, seed=1, transform=tf)
    acc = knn_monitor(mae, train_ds, val_ds, "cpu", k=20, T=0.07, batch_size=64)
    assert isinstance(acc, float) and 0.0 <= acc <= 100.0
    assert mae.training and mae.encoder.training


# ---------------------------------------------------------------------------------- linear probe
def test_linprobe_end_to_end_cached(ckpts, tmp_path):
    out = tmp_path / "lp"
    argv = [
        "linprobe",
        "--checkpoint",
        str(ckpts["pt"]),
        "--output",
        str(out),
        "--no-augment",
        "--epochs",
        "30",
        "--batch-size",
        "64",
        "--optimizer",
        "sgd",
        "--base-lr",
        "0.4",
        "warmup_epochs=3",
    ] + synth(1024)
    assert run_cli(argv) == 0
    ev = read_eval(out)
    assert ev["protocol"] == "linprobe" and ev["cached_features"] is True and ev["config"]["optimizer"] == "sgd"
    assert ev["metrics"]["top1"] > CHANCE + 15, ev["metrics"]
    recs = records(out)
    assert [r["epoch"] for r in recs] == list(range(1, 31)) and all("top1" in r and "lr" in r for r in recs)
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert (out / "config.yaml").is_file()


def _probe_cfg(ckpt: Path, out: Path, **kw) -> LinprobeConfig:
    data = DataConfig(name="synthetic", num_samples=256, num_classes=4, num_workers=0, crop_pct=1.0)
    base = {
        "checkpoint": str(ckpt),
        "data": data,
        "output": str(out),
        "augment": False,
        "epochs": 2,
        "warmup_epochs": 1,
        "batch_size": 32,
        "seed": 3,
    }
    return LinprobeConfig(**{**base, **kw})


def test_cached_and_streaming_probes_give_the_same_head(ckpts, tmp_path):
    original = load_pretrained(ckpts["pt"]).encoder.state_dict()
    heads = {}
    for cache in (True, False):
        loop = probe_loop(_probe_cfg(ckpts["pt"], tmp_path / str(cache), cache_features=cache))
        loop.run()
        assert loop.p.cached is cache and read_eval(tmp_path / str(cache))["cached_features"] is cache
        heads[cache] = loop.p.model.head.state_dict()
        # the frozen encoder is bit-identical to the checkpoint's, buffers included
        after = loop.p.model.encoder.state_dict()
        assert after.keys() == original.keys()
        assert all(torch.equal(after[k], original[k]) for k in original)
    for k in heads[True]:
        assert torch.allclose(heads[True][k].float(), heads[False][k].float(), atol=1e-5, rtol=1e-4), k
    assert not torch.allclose(heads[True]["1.weight"], torch.zeros_like(heads[True]["1.weight"]))


def test_partial_finetuning_changes_only_the_last_blocks(ckpts, tmp_path):
    original = load_pretrained(ckpts["pt"]).encoder.state_dict()
    loop = probe_loop(
        _probe_cfg(
            ckpts["pt"],
            tmp_path,
            train_blocks=1,
            epochs=1,
            base_lr=10.0,
            data=DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0),
        )
    )
    assert not loop.p.cached
    loop.run()
    for name, p in loop.p.model.encoder.named_parameters():
        tuned = name.startswith(("blocks.1.", "norm."))
        assert p.requires_grad == tuned, name
        if tuned:
            if p.ndim > 1:
                assert not torch.equal(p.detach(), original[name]), f"{name} did not change"
        else:
            assert p.grad is None, name
            assert torch.equal(p.detach(), original[name]), f"frozen {name} changed"


# ---------------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow  # 8 s; default suite: test_finetune_resume, test_finetune_two_processes_match_one
def test_finetune_learns(ckpts, tmp_path):
    """Light recipe (no mixup / RandAugment) so a few seconds of CPU training show learning."""
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--checkpoint",
        str(ckpts["pt"]),
        "--output",
        str(out),
        "--epochs",
        "5",
        "--batch-size",
        "64",
        "--lr",
        "2e-3",
        "warmup_epochs=1",
        "mixup=0",
        "cutmix=0",
        "auto_augment=null",
        "reprob=0",
        "smoothing=0",
        "--drop-path",
        "0",
        "data.min_scale=1.0",
    ] + synth(512)
    assert run_cli(argv) == 0
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.1, [r["loss"] for r in recs]
    ev = read_eval(out)
    assert ev["protocol"] == "finetune" and ev["metrics"]["best_top1"] > CHANCE + 8, ev["metrics"]
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()


def test_finetune_paper_recipe_ema_resume_and_class_count_check(ckpts, tmp_path, capsys):
    out = tmp_path / "ft"
    base = [
        "finetune",
        "--checkpoint",
        str(ckpts["pt"]),
        "--output",
        str(out),
        "--batch-size",
        "32",
        "--ema",
        "warmup_epochs=0",
    ]
    assert run_cli(base + ["--epochs", "1"] + synth(96, classes=6)) == 0
    ev = read_eval(out)
    cfg = ev["config"]
    assert cfg["mixup"] == 0.8 and cfg["cutmix"] == 1.0 and cfg["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert {"top1", "top5", "ema_top1", "best_top1"} <= set(ev["metrics"])
    rec = records(out)[0]
    assert {"epoch", "loss", "lr", "img_per_s", "top1", "top5", "val_loss", "ema_top1"} <= set(rec)

    assert "already holds" in error_line(capsys, base + ["--epochs", "1"] + synth(96, classes=6))
    resumed = base + ["--epochs", "2", "--resume"]
    assert re.search("6-class head.*4 classes", error_line(capsys, resumed + synth(96, classes=4)))
    assert run_cli(base + ["--epochs", "2", "--resume"] + synth(96, classes=6)) == 0
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert read_eval(out)["metrics"]["epochs"] == 2


def test_finetune_partial_freezes_exactly_the_early_layers(ckpts, tmp_path):
    encoder = load_pretrained(ckpts["pt"]).encoder_state_dict()
    data = DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0)
    cfg = FinetuneConfig(
        checkpoint=str(ckpts["pt"]),
        data=data,
        output=str(tmp_path),
        epochs=1,
        batch_size=32,
        warmup_epochs=0,
        lr=1e-2,
        train_blocks=1,
    )
    loop = finetune_loop(cfg)
    grads: dict[str, bool] = {}
    hooks = [
        p.register_hook(lambda g, n=n: grads.__setitem__(n, True))
        for n, p in loop.p.model.named_parameters()
        if p.requires_grad
    ]
    loop.run()
    for h in hooks:
        h.remove()
    for name, p in loop.p.model.named_parameters():
        tuned = name.startswith(("blocks.1.", "fc_norm.", "head."))
        assert p.requires_grad == tuned, name
        assert grads.get(name, False) == tuned, name
        if name in encoder and not tuned:
            assert torch.equal(p.detach(), encoder[name]), f"frozen {name} changed"
        if tuned and name.endswith("weight") and name in encoder and p.ndim > 1:
            assert not torch.equal(p.detach(), encoder[name]), f"{name} did not change"


def test_finetune_from_scratch(tmp_path):
    out = tmp_path / "scratch"
    argv = [
        "finetune",
        "--from-scratch",
        "--checkpoint",
        "ignored.pt",
        "--model",
        "mae_vit_pico_patch4_32",
        "model_args.depth=1",
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "warmup_epochs=0",
    ] + synth(64)
    assert run_cli(argv) == 0
    ev = read_eval(out)
    assert ev["checkpoint"] == "scratch" and ev["metrics"]["epochs"] == 1


def test_evaluation_uses_no_augmentation(ckpts, tmp_path):
    data = DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0)
    ft = finetune_loop(
        FinetuneConfig(
            checkpoint=str(ckpts["pt"]),
            data=data,
            output=str(tmp_path / "ft"),
            epochs=1,
            warmup_epochs=0,
            batch_size=32,
        )
    ).p
    lp = probe_loop(
        LinprobeConfig(
            checkpoint=str(ckpts["pt"]),
            data=data,
            output=str(tmp_path / "lp"),
            augment=True,
            epochs=1,
            warmup_epochs=0,
            batch_size=32,
        )
    ).p
    tf = eval_transform(32, ft.mean, ft.std, crop_pct=1.0)
    for obj in (ft, lp):
        raw, _ = obj.val_ds.raw(5)
        items = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            items.append(obj.val_ds[5][0])
        assert torch.equal(items[0], items[1]) and torch.equal(items[0], tf(raw))
        # ... whereas the training split is augmented (so the check above means something)
        train = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            train.append(obj.train_ds[5][0])
        assert not torch.equal(train[0], train[1])
    # evaluation runs the model in eval mode (drop path 0.1 would make it random) and restores train mode
    ft.model.train()
    modes = []
    hook = ft.model.register_forward_hook(lambda m, i, o: modes.append(m.training))
    a = ft.evaluate(1, final=True)
    b = ft.evaluate(1, final=True)
    hook.remove()
    assert {"top1", "val_loss"} <= set(a) and a == b and modes and not any(modes) and ft.model.training


# ---------------------------------------------------------------------------------- user mistakes
def _unlabeled_folder(root: Path) -> Path:
    from PIL import Image

    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 20)).save(root / f"img{i}.png")
    return root


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_unlabeled_data_is_a_one_line_error(ckpts, tmp_path, command, capsys):
    folder = _unlabeled_folder(tmp_path / "imgs")
    argv = [
        command,
        "--checkpoint",
        str(ckpts["pt"]),
        "--data",
        str(folder),
        "--output",
        str(tmp_path / "o"),
        "--num-workers",
        "0",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert f"has no labels: {command} needs a labeled dataset" in error_line(capsys, argv)


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_architecture_mismatch_is_a_one_line_error(ckpts, tmp_path, command, capsys):
    argv = [
        command,
        "--checkpoint",
        str(ckpts["pt"]),
        "--model",
        "mae_vit_tiny_patch4_32",
        "--output",
        str(tmp_path / "o"),
    ] + synth(64)
    line = error_line(capsys, argv)
    assert "architecture does not match" in line and "embed_dim=64" in line


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert "not found" in error_line(capsys, ["knn", "--checkpoint", str(tmp_path / "nope.pt")] + synth(64))


@pytest.mark.slow  # 5 s (a real process); default: every CLI test through maelab.cli.main
def test_installed_console_script_runs_an_evaluation(ckpts, tmp_path):
    """The ``maelab`` console script that ``pip install`` puts beside the interpreter, as a user runs it."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("maelab", path=path)
    assert exe, "no maelab console script on PATH: pip install -e '.[test]'"
    out = tmp_path / "knn"
    proc = subprocess.run(
        [exe, "knn", "--checkpoint", str(ckpts["safetensors"]), "--output", str(out)] + synth(128),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-1" in proc.stdout and read_eval(out)["protocol"] == "knn"


def test_shared_cifar10_copy_feeds_every_protocol(ckpts, cifar10_dir, tmp_path, monkeypatch):
    """The real CIFAR-10 ImageFolder copy (when present): labeled train/test splits, 10 classes."""
    data = DataConfig(name=str(cifar10_dir), num_workers=0, crop_pct=1.0)
    ft = finetune_loop(
        FinetuneConfig(checkpoint=str(ckpts["pt"]), data=data, output=str(tmp_path / "ft"), epochs=1, warmup_epochs=0)
    ).p
    assert (len(ft.train_ds), len(ft.val_ds), ft.num_classes) == (50000, 10000, 10)
    img, label = ft.val_ds[0]
    assert img.shape == (3, 32, 32) and label == 0
    # the probe extracts the cached features when it is built: the splits it would read, not 60000 encodings
    extracted: dict[str, int] = {}

    def no_extraction(self, ds, desc):
        extracted[desc] = len(ds)
        return torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)

    monkeypatch.setattr(LinearProbing, "_extract", no_extraction)
    lp = probe_loop(
        LinprobeConfig(
            checkpoint=str(ckpts["pt"]),
            data=data,
            output=str(tmp_path / "lp"),
            augment=False,
            epochs=1,
            warmup_epochs=0,
        )
    ).p
    assert lp.cached and lp.num_classes == 10
    assert extracted == {"train features": 50000, "test features": 10000}
