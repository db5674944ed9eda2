"""Every command README.md shows runs as written up to the point where it would start working: the flags parse
with the real parser, recipes and ``key=value`` overrides build a valid config, sweep files load. (The
commands that only need the built-in data are also run end to end elsewhere: the quickstart in
tests/cli/test_cli.py, the evaluations in tests/eval.) A renamed flag, a deleted recipe or a key that no longer
exists fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from maelab.cli import build_parser, config_overrides
from maelab.config import PretrainConfig, build_config
from maelab.eval.config import EmbedConfig, FinetuneConfig, KnnConfig, LinprobeConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "linprobe": LinprobeConfig,
    "knn": KnnConfig,
    "embed": EmbedConfig,
}


def readme_commands() -> list[str]:
    """The ``maelab ...`` command lines of README's bash blocks (continuations joined, comments dropped,
    launcher prefixes ``torchrun ... -m`` / ``srun ... python -m`` removed)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                m = re.search(r"(?:^|-m )(maelab .*)$", part)
                if m:
                    commands.append(m.group(1).replace(" ...", "").strip())
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_we_expect_to_check():
    assert len(COMMANDS) >= 35
    for command in (
        "pretrain",
        "tokenizer",
        "finetune",
        "linprobe",
        "knn",
        "embed",
        "sweep",
        "visualize",
        "compare",
        "report",
        "export",
        "bench",
    ):
        assert any(c.split()[1] == command for c in COMMANDS), command


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_and_builds_its_config(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes/ and sweeps/ paths are relative to the repository, as README says
    argv = shlex.split(command)[1:]
    args, extra = build_parser().parse_known_args(argv)
    assert not [x for x in extra if x.startswith("-") or "=" not in x], extra
    if extra:
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    if args.command in CONFIGS:
        build_config(CONFIGS[args.command], args.config, config_overrides(args))
    elif args.command == "tokenizer":
        from maelab.methods.tokenizer import TokenizerConfig

        build_config(TokenizerConfig, args.config, config_overrides(args))
    elif args.command == "sweep":
        from maelab.sweep import load_sweep

        load_sweep(args.sweep, args.scale, args.data)


# Commands whose inputs exist once the quickstart has run, in README order; the others name data the user brings
# (ImageNet, path/to/..., my_photos/) or run the default 10-epoch schedule (`pretrain --init`), and are covered
# above up to the point where they would read their data.
RUNNABLE = (
    "maelab pretrain --config recipes/synthetic_tiny.yaml --output runs/quickstart",
    "maelab report runs/quickstart",
    "maelab report runs/quickstart --output quickstart.html",
    "maelab knn      --checkpoint runs/quickstart --config recipes/knn_synthetic_tiny.yaml",
    "maelab linprobe --checkpoint runs/quickstart --config recipes/linprobe_synthetic_tiny.yaml",
    "maelab finetune --checkpoint runs/quickstart --config recipes/finetune_synthetic_tiny.yaml",
    "maelab export --checkpoint runs/quickstart --output encoder.safetensors",
    "maelab export --checkpoint runs/quickstart --format hf --output hf_mae",
    "maelab export --checkpoint runs/quickstart --format hf --encoder-only --output hf_vit",
    "maelab bench --device cpu",
)


@pytest.mark.slow  # 4-5 minutes on 2 cores: the quickstart run and its evaluations, as a new user types them
def test_readme_quickstart_commands_run_as_written(tmp_path, monkeypatch):
    from maelab.cli import main

    for name in ("recipes", "sweeps"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    for command in RUNNABLE:
        assert " ".join(command.split()) in {" ".join(c.split()) for c in COMMANDS}, f"not in README: {command}"
        assert main(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "runs/quickstart/report.html").is_file() and (tmp_path / "quickstart.html").is_file()
    assert (tmp_path / "hf_mae" / "config.json").is_file() and (tmp_path / "encoder.safetensors").is_file()
