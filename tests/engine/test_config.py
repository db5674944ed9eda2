import logging

import pytest

from maelab.config import PretrainConfig, build_config, parse_override, save_yaml
from maelab.errors import ConfigError
from maelab.eval.config import FinetuneConfig, LinprobeConfig


@pytest.mark.parametrize(
    "override, field",
    [
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"model_args.mask_ratio": 1.0}, "mask_ratio"),
        ({"model_args.mask_ratio": -0.1}, "mask_ratio"),
        ({"model_args.img_size": 30}, "img_size"),
        ({"model_args.mask_type": "diagonal"}, "mask_type"),
        ({"model_args.bogus": 1}, "model_args"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"global_batch": -8}, "global_batch"),
        ({"precision": "fp8"}, "precision"),
        ({"data.num_workers": -2}, "data.num_workers"),
        ({"data.min_scale": 0}, "data.min_scale"),
        ({"epochs": "ten"}, "epochs"),
        ({"unknown_key": 3}, "unknown_key"),
        ({"betas": [0.9, 1.5]}, "betas"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        cfg = build_config(PretrainConfig, None, override)
        from maelab.models.registry import get_config

        get_config(cfg.model, **cfg.model_args)  # model-level checks happen here


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = build_config(
        PretrainConfig,
        None,
        {"epochs": 3, "data.name": "synthetic", "model_args.norm_pix_loss": True, "betas": [0.9, 0.99]},
    )
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    again = build_config(PretrainConfig, path)
    assert again == cfg
    assert build_config(PretrainConfig, path, {"epochs": 5}).epochs == 5


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(PretrainConfig, bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(PretrainConfig, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        build_config(PretrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "e.yaml").write_text("epochs: -3\n")
    with pytest.raises(ConfigError, match=r"e\.yaml.*epochs"):
        build_config(PretrainConfig, tmp_path / "e.yaml")


def test_parse_override():
    assert parse_override("data.num_workers=4") == ("data.num_workers", 4)
    assert parse_override("model_args.norm_pix_loss=true") == ("model_args.norm_pix_loss", True)
    assert parse_override("output=runs/x") == ("output", "runs/x")
    with pytest.raises(ConfigError):
        parse_override("epochs")


def test_recipes_are_valid(monkeypatch):
    from pathlib import Path

    from maelab.models.registry import get_config

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    # tokenizer recipes: tests/methods/test_tokenizer.py
    pretrain = [r for r in recipes if not r.name.startswith(("finetune", "linprobe", "knn", "tokenizer"))]
    assert {r.stem for r in pretrain} >= {"synthetic_tiny", "cifar10_vit_tiny", "imagenet_vit_base_paper"}
    for r in pretrain:
        cfg = build_config(PretrainConfig, r)
        get_config(cfg.model, **cfg.model_args)
    paper = build_config(PretrainConfig, Path(recipes[0]).parent / "imagenet_vit_base_paper.yaml")
    assert paper.global_batch == 4096 and paper.effective_batch() == 4096  # one process: 64 x 64 accum
    assert paper.resolved_lr() == pytest.approx(2.4e-3)
    assert paper.epochs == 800 and paper.warmup_epochs == 40 and paper.model_args["norm_pix_loss"] is True
    # global_batch 4096 at any GPU count with PRETRAIN.md's per-GPU 64 as the cap: (batch, accum) per world size
    for world, split in ((1, (64, 64)), (8, (64, 8))):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for name in ("imagenet_vit_base_paper", "imagenet_vit_large_paper"):  # large: PRETRAIN.md
            cfg = build_config(PretrainConfig, Path(recipes[0]).parent / f"{name}.yaml")
            assert (cfg.global_batch, (cfg.batch_size, cfg.accum_steps), cfg.effective_batch(world)) == (
                4096,
                split,
                4096,
            ), (name, world)
            assert cfg.resolved_lr(world) == pytest.approx(2.4e-3) and (cfg.epochs, cfg.warmup_epochs) == (800, 40)
    assert cfg.model == "mae_vit_large_patch16"


EVAL_SOURCE = {"checkpoint": "ckpt.pt"}  # the configs only check that a source is named


@pytest.mark.parametrize(
    "cls, extra", [(PretrainConfig, {}), (FinetuneConfig, EVAL_SOURCE), (LinprobeConfig, EVAL_SOURCE)]
)
def test_warmup_longer_than_the_run_becomes_the_run_with_one_warning(cls, extra, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = build_config(cls, None, {**extra, "epochs": 2, "warmup_epochs": 10})
    assert cfg.warmup_epochs == 2
    assert [r.getMessage() for r in caplog.records] == [
        "warmup_epochs=10 is longer than the run (epochs=2): warming up over all 2 epochs instead"
    ]
    caplog.clear()
    assert build_config(cls, None, {**extra, "epochs": 2, "warmup_epochs": 1.5}).warmup_epochs == 1.5
    assert not caplog.records
    with pytest.raises(ConfigError, match="warmup_epochs=-1.*0 or more"):
        build_config(cls, None, {**extra, "warmup_epochs": -1})


# (world size, per-process batch, accum_steps) for a global batch of 4096 with batch_size 64 as the cap
@pytest.mark.parametrize("world, batch, accum", [(1, 64, 64), (2, 64, 32), (8, 64, 8), (128, 32, 1)])
def test_global_batch_gives_per_process_batch_and_accumulation(world, batch, accum, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = build_config(PretrainConfig, None, {"global_batch": 4096, "batch_size": 64})
    assert (cfg.batch_size, cfg.accum_steps) == (batch, accum)
    assert cfg.effective_batch(world) == 4096 and cfg.resolved_lr(world) == pytest.approx(1.5e-4 * 4096 / 256)
    ft = build_config(FinetuneConfig, None, {**EVAL_SOURCE, "global_batch": 1024, "batch_size": 128})
    assert ft.effective_batch(world) == 1024 and ft.batch_size <= 128
    probe = build_config(LinprobeConfig, None, {**EVAL_SOURCE, "global_batch": 16384, "batch_size": 16384})
    assert probe.batch_size == 16384 // world and probe.resolved_lr(world) == pytest.approx(0.1 * 16384 / 256)


def test_global_batch_picks_the_fewest_equal_micro_batches_under_the_cap(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = build_config(PretrainConfig, None, {"global_batch": 1000, "batch_size": 128})
    assert (cfg.batch_size, cfg.accum_steps) == (125, 4)  # 500 per process: 4 x 125 (3 x 166.7 is not equal)
    assert build_config(PretrainConfig, None, {"batch_size": 48, "accum_steps": 3}).accum_steps == 3  # unset: kept


def test_accum_steps_given_with_global_batch_is_refused_naming_both(monkeypatch):
    """An explicit accum_steps (flag or key=value) next to a global_batch (recipe or override) is refused in one
    line instead of being replaced by the derived value; without global_batch it is kept."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "imagenet_vit_base_paper.yaml"  # global_batch 4096
    with pytest.raises(
        ConfigError,
        match=r"^accum_steps=2 and global_batch=4096 \(in .*imagenet_vit_base_paper.yaml\)"
        r" both given: .*drop accum_steps, or set global_batch=0",
    ):
        build_config(PretrainConfig, recipe, {"accum_steps": 2})
    with pytest.raises(ConfigError, match=r"^accum_steps=4 and global_batch=1024 both given"):
        build_config(FinetuneConfig, None, {**EVAL_SOURCE, "global_batch": 1024, "accum_steps": 4})
    kept = build_config(PretrainConfig, recipe, {"accum_steps": 2, "global_batch": 0})
    assert (kept.batch_size, kept.accum_steps, kept.global_batch) == (64, 2, 0)


def test_a_runs_config_yaml_with_global_batch_reloads_at_any_world_size(tmp_path, monkeypatch):
    """config.yaml records global_batch and the derived batch_size / accum_steps: it is not an explicit
    accum_steps, so it reloads (as for --resume) at another world size, to the same global batch."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    saved = build_config(PretrainConfig, None, {"global_batch": 4096, "batch_size": 64})
    save_yaml(saved, tmp_path / "config.yaml")
    for world, split in ((8, (64, 8)), (1, (64, 64)), (2, (64, 32))):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = build_config(PretrainConfig, tmp_path / "config.yaml", {"epochs": 20, "batch_size": 64})
        assert ((cfg.batch_size, cfg.accum_steps), cfg.effective_batch(world)) == (split, 4096)


def test_resume_from_a_global_batch_runs_own_config_yaml(tmp_path, capsys):
    """`maelab pretrain --config RUN/config.yaml --resume` continues a global_batch run; adding --accum-steps is
    the one-line refusal."""
    from tests.conftest import TINY_MODEL_ARGS

    from maelab.cli import main

    out = tmp_path / "run"
    common = ["--no-progress", "--num-workers", "0"]
    assert (
        main(
            [
                "pretrain",
                "--output",
                str(out),
                "--epochs",
                "1",
                "global_batch=16",
                "--batch-size",
                "8",
                "data.num_samples=16",
                *[f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()],
                *common,
            ]
        )
        == 0
    )
    assert "accum_steps: 2\nglobal_batch: 16\n" in (out / "config.yaml").read_text()
    assert main(["pretrain", "--config", str(out / "config.yaml"), "--epochs", "2", "--resume", *common]) == 0
    assert "finished: epoch 2/2, step 2" in capsys.readouterr().out
    assert main(["pretrain", "--config", str(out / "config.yaml"), "--accum-steps", "1", "--resume", *common]) == 2
    assert capsys.readouterr().err.startswith("maelab: error: accum_steps=1 and global_batch=16 (in ")


def test_global_batch_split_into_small_micro_batches_warns_once_with_a_better_value(monkeypatch, caplog):
    """509 images per process (a prime) under a cap of 64 can only be 1 x 509: one warning (rank 0) naming the split
    and a global_batch that splits into full micro-batches; a good split, another rank or the reloaded derived
    config stay silent."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    with caplog.at_level(logging.WARNING):
        cfg = build_config(PretrainConfig, None, {"global_batch": 8 * 509, "batch_size": 64})
    assert (cfg.batch_size, cfg.accum_steps) == (1, 509)
    assert [r.getMessage() for r in caplog.records] == [
        "global_batch=4072 over 8 processes is 509 images per process, split as batch 1 x 509 accum_steps "
        "(batch_size=64 is the cap): a slow split; set e.g. global_batch=4096 (batch 64 x 8 accum_steps), "
        "or batch_size=509 if that fits in memory"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_config(PretrainConfig, None, {"global_batch": 4096, "batch_size": 64})  # 64 x 8
        build_config(PretrainConfig, None, {"global_batch": 8 * 96, "batch_size": 64})  # 96 = 2 x 48: over half
        build_config(PretrainConfig, None, {"global_batch": 8 * 509, "batch_size": 1})  # config.yaml's values
        monkeypatch.setenv("RANK", "3")
        build_config(PretrainConfig, None, {"global_batch": 8 * 509, "batch_size": 64})
    assert not caplog.records


def test_global_batch_that_does_not_divide_is_an_error_naming_the_values(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    for cls, extra in [(PretrainConfig, {}), (FinetuneConfig, EVAL_SOURCE), (LinprobeConfig, EVAL_SOURCE)]:
        with pytest.raises(ConfigError, match=r"global_batch=4096: it does not divide among 3 processes"):
            build_config(cls, None, {**extra, "global_batch": 4096})


def test_global_batch_splits_the_same_way_in_every_training_protocol(monkeypatch):
    """The linear probe has the training loop's accum_steps too (1 by default): a share above batch_size is split
    into micro-batches as in pre-training and fine-tuning."""
    assert LinprobeConfig(checkpoint="x").accum_steps == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    for cls, extra in [(PretrainConfig, {}), (FinetuneConfig, EVAL_SOURCE), (LinprobeConfig, EVAL_SOURCE)]:
        cfg = build_config(cls, None, {**extra, "global_batch": 16384, "batch_size": 1024})
        assert (cfg.batch_size, cfg.accum_steps, cfg.effective_batch(2)) == (1024, 8, 16384), cls.__name__
