"""Command-line flags generated from the config dataclasses: every field reachable, help from its doc string,
and every flag spelling of the former hand-kept tables still mapping to the same key."""

import argparse
import json
from dataclasses import fields, is_dataclass
from typing import Any, get_origin, get_type_hints

import pytest

from maelab.cli import build_parser, config_overrides
from maelab.config import DataConfig, PretrainConfig, build_config, field_docs, to_dict
from maelab.eval.config import EmbedConfig, FinetuneConfig, KnnConfig, LinprobeConfig

COMMANDS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "linprobe": LinprobeConfig,
    "knn": KnnConfig,
    "embed": EmbedConfig,
}
REQUIRED = {"pretrain": [], "embed": ["--checkpoint", "c.pt", "--output", "f.npy"]}
SOURCE = ["--checkpoint", "c.pt"]

# the former tables (src/maelab/cli.py _common_overrides, src/maelab/eval/cli.py FLAG_KEYS / SWITCH_KEYS):
# flag -> (command line after it, dotted key, value)
SHARED = {
    "--data": (["cifar10"], "data.name", "cifar10"),
    "--data-root": (["/r"], "data.root", "/r"),
    "--download": ([], "data.download", True),
    "--strict-data": ([], "data.strict", True),
    "--model": (["mae_vit_tiny_patch4_32"], "model", "mae_vit_tiny_patch4_32"),
    "--batch-size": (["8"], "batch_size", 8),
    "--output": (["runs/x"], "output", "runs/x"),
    "--device": (["cpu"], "device", "cpu"),
    "--precision": (["fp32"], "precision", "fp32"),
    "--seed": (["3"], "seed", 3),
    "--num-workers": (["2"], "data.num_workers", 2),
}
TRAINING = {
    "--epochs": (["2"], "epochs", 2),
    "--lr": (["0.01"], "lr", 0.01),
    "--base-lr": (["0.02"], "base_lr", 0.02),
}
EVAL = {**SHARED, "--checkpoint": (["c.pt"], "checkpoint", "c.pt"), "--pool": (["avg"], "pool", "avg")}
OLD_FLAGS = {
    "pretrain": {
        **SHARED,
        **TRAINING,
        "--accum-steps": (["2"], "accum_steps", 2),
        "--mask-ratio": (["0.5"], "model_args.mask_ratio", 0.5),
        "--norm-pix-loss": ([], "model_args.norm_pix_loss", True),
        "--compile": ([], "compile", "on"),
        "--no-compile": ([], "compile", "off"),
        "--compile-mode": (["max-autotune"], "compile_mode", "max-autotune"),
        "--fp8": (["rowwise"], "fp8", "rowwise"),
        "--init": (["w.pth"], "init", "w.pth"),
        "--init-encoder": (["e.pth"], "init_encoder", "e.pth"),
    },
    "finetune": {
        **EVAL,
        **TRAINING,
        "--train-blocks": (["2"], "train_blocks", 2),
        "--accum-steps": (["2"], "accum_steps", 2),
        "--from-scratch": ([], "from_scratch", True),
        "--layer-decay": (["0.65"], "layer_decay", 0.65),
        "--drop-path": (["0.2"], "drop_path", 0.2),
        "--ema": ([], "ema", True),
    },
    "linprobe": {
        **EVAL,
        **TRAINING,
        "--train-blocks": (["2"], "train_blocks", 2),
        "--optimizer": (["sgd"], "optimizer", "sgd"),
        "--no-augment": ([], "augment", False),
        "--no-cache": ([], "cache_features", False),
    },
    "knn": {**EVAL, "--k": (["5"], "k", 5), "--temperature": (["0.1"], "temperature", 0.1)},
    "embed": EVAL,
}
OTHER_FLAGS = {  # not config keys
    "pretrain": ["--config", "--resume", "--max-steps", "--no-progress"],
    "finetune": ["--config", "--resume", "--no-progress"],
    "linprobe": ["--config", "--no-progress"],
    "knn": ["--config", "--no-progress"],
    "embed": ["--config", "--no-progress"],
}


PARSER = build_parser()


def parse(argv: list[str]) -> argparse.Namespace:
    return PARSER.parse_args(argv)


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def flag_fields(cls: type) -> list[str]:
    """The top-level fields that get a ``--field-name`` flag (all but the nested sections data and model_args)."""
    hints = get_type_hints(cls)
    return [f.name for f in fields(cls) if not (is_dataclass(hints[f.name]) or get_origin(hints[f.name]) is dict)]


@pytest.mark.parametrize("command", COMMANDS)
def test_former_flags_map_to_the_same_keys(command):
    for flag, (values, key, value) in OLD_FLAGS[command].items():
        args = parse([command, flag, *values])
        assert config_overrides(args) == {key: value}, flag
    options = {s for a in subparser(command)._actions for s in a.option_strings}
    assert set(OTHER_FLAGS[command]) <= options


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_a_flag_with_its_doc_as_help(command):
    cls = COMMANDS[command]
    docs = field_docs(cls)
    by_flag = {s: a for a in subparser(command)._actions for s in a.option_strings}
    for name in flag_fields(cls):
        action = by_flag["--" + name.replace("_", "-")]
        assert action.dest == name and action.help == docs[name].replace("%", "%%") and docs[name], name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_round_trips_its_default_value(command):
    """Each generated flag, given the protocol's default value, parses to a key=value that builds the same config:
    the flag's type, choices and action fit the field."""
    cls = COMMANDS[command]
    required = REQUIRED.get(command, SOURCE)
    base = parse([command, *required])
    default = build_config(cls, None, config_overrides(base))
    values = to_dict(default)
    for action in subparser(command)._actions:
        key = action.dest
        if key not in base.config_keys or key.startswith("model_args."):  # model_args: the preset's values
            continue
        value: Any = values
        for part in key.split("."):
            value = value[part]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv = [action.option_strings[0] if value else action.option_strings[1]]
        elif isinstance(action, argparse._StoreConstAction):
            if action.const != value:
                continue  # e.g. --download, with download off by default: the former-flags test sets it
            argv = action.option_strings
        elif value is None:
            continue
        else:
            argv = [action.option_strings[0], json.dumps(value) if isinstance(value, list) else str(value)]
        args = parse([command, *required, *argv])
        got = build_config(cls, None, config_overrides(args))
        assert got == default, (command, argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_nested_data_key_is_reachable_by_key_value(command):
    """data.* keys have no flag of their own (some have an alias): each one is reachable as key=value."""
    cls = COMMANDS[command]
    required = REQUIRED.get(command, SOURCE)
    default = build_config(cls, None, config_overrides(parse([command, *required])))
    for f in fields(DataConfig):
        value = to_dict(default.data)[f.name]
        args = parse([command, *required, f"data.{f.name}={json.dumps(value)}"])
        assert config_overrides(args)["data." + f.name] == value
        assert build_config(cls, None, config_overrides(args)) == default, f.name


def test_a_key_value_beats_a_flag_and_flags_beat_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nbatch_size: 4\n")
    args = parse(["pretrain", "--config", str(recipe), "--epochs", "3", "epochs=5"])
    cfg = build_config(PretrainConfig, args.config, config_overrides(args))
    assert (cfg.epochs, cfg.batch_size) == (5, 4)


def test_values_of_union_fields_parse_as_yaml():
    args = parse(["finetune", "--num-workers", "auto", "--img-size", "[32, 48]", "--lr", "1e-3"])
    assert config_overrides(args) == {"data.num_workers": "auto", "img_size": [32, 48], "lr": 1e-3}


def test_bad_flag_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["pretrain", "--epochs", "ten"])
    assert e.value.code == 2 and "--epochs: invalid int value: 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["linprobe", "--optimizer", "adam"])
