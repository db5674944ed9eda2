"""``maelab sweep``: a 2-run CPU sweep end to end, interrupted and continued, writes the table and figures."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from maelab.cli import main
from maelab.errors import ConfigError
from maelab.sweep import load_sweep, run_sweep

TINY = {
    "model": "mae_vit_pico_patch4_32",
    "epochs": 2,
    "batch_size": 16,
    "warmup_epochs": 1,
    "data": {"num_samples": 64, "num_workers": 0},
    "device": "cpu",
}


def write_sweep(path, **extra):
    spec = {
        "name": "tiny",
        "data": "synthetic",
        "pretrain": TINY,
        "evals": [{"protocol": "knn", "data": {"num_samples": 64, "num_workers": 0}, "batch_size": 32}],
        "runs": [{"name": "mae"}, {"name": "ae", "pretrain": {"method": "ae"}}],
        "figures": [{"file": "ratio.png", "x": "model_args.mask_ratio", "runs": ["mae", "ae"]}],
        **extra,
    }
    spec["runs"][0]["pretrain"] = {"model_args.mask_ratio": 0.75}
    spec["runs"][1]["pretrain"]["model_args.mask_ratio"] = 0.0
    path.write_text(yaml.safe_dump(spec))
    return path


def test_interrupted_sweep_continues_where_it_stopped_and_writes_the_table(tmp_path, monkeypatch):
    import maelab.engine.loop as loop_mod

    sweep_file = write_sweep(tmp_path / "sweep.yaml")
    out = tmp_path / "out"
    real_run = loop_mod.Loop.run
    calls: list[tuple[str, int | None, int]] = []

    def stop_second_run_after_one_step(self, max_steps=None):  # what a SIGTERM during run "ae" leaves
        calls.append((self.p.kind, max_steps, self.step))
        if self.p.kind == "pretrain" and self.out.parent.name == "ae" and self.step == 0:
            return real_run(self, max_steps=1)
        return real_run(self, max_steps=max_steps)

    monkeypatch.setattr(loop_mod.Loop, "run", stop_second_run_after_one_step)
    rows = run_sweep(sweep_file, out, progress=False)
    assert [r["run"] for r in rows] == ["mae", "ae"]
    assert rows[0]["knn_top1"] is not None and rows[1]["knn_top1"] is None  # "ae" stopped before its evaluation
    assert (out / "ae" / "pretrain" / "checkpoints" / "last.pt").exists()
    mae_ckpt = (out / "mae" / "pretrain" / "checkpoints" / "last.pt").stat().st_mtime_ns

    calls.clear()
    rows = run_sweep(sweep_file, out, progress=False)
    # the finished run is skipped; the stopped one resumes from step 1 (its checkpoint), not from 0
    assert calls == [("pretrain", None, 1)]
    assert (out / "mae" / "pretrain" / "checkpoints" / "last.pt").stat().st_mtime_ns == mae_ckpt
    assert [r["epochs"] for r in rows] == [2, 2] and all(r["knn_top1"] is not None for r in rows)
    assert rows[1]["method"] == "ae" and rows[1]["overrides"] == "model_args.mask_ratio=0.0"
    assert all(r["gflops_per_img"] > 0 and r["pretrain_s"] > 0 for r in rows)

    table = json.loads((out / "sweep.json").read_text())
    assert table["rows"] == json.loads(json.dumps(rows))
    with open(out / "sweep.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["mae", "ae"]
    md = (out / "sweep.md").read_text()
    assert "| mae | mae |" in md and "| ae | ae |" in md and "kNN top-1" in md
    assert (out / "sweep.png").stat().st_size > 0 and (out / "ratio.png").stat().st_size > 0

    assert main(["report", str(out)]) == 0  # a sweep directory: the table, its figures, each run's pictures
    page = (out / "report.html").read_text()
    assert "maelab sweep report" in page and "<td>mae</td>" in page and "<td>ae</td>" in page
    assert page.count("<img ") == 2 + 2 * 2  # sweep.png, ratio.png; per run its reconstruction and loss curve


def test_budget_sets_epochs_from_timed_steps_once(tmp_path, monkeypatch):
    import maelab.sweep as sweep_mod

    sweep_file = write_sweep(tmp_path / "sweep.yaml", scales={"quick": {"budget_s": 30.0}})
    spec = load_sweep(sweep_file, "quick").runs[0]
    timings = iter([{"step_s": 2.5, "steps_per_epoch": 4, "flops_per_image": 1e6}])
    monkeypatch.setattr(sweep_mod, "_calibrate", lambda spec, run_dir, steps: next(timings))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sweep = load_sweep(sweep_file, "quick")
    plan = sweep_mod._plan(sweep, spec, run_dir, is_main=True)
    assert plan["epochs"] == 3  # floor(30 s / (2.5 s x 4 steps))
    assert sweep_mod._plan(sweep, spec, run_dir, is_main=True) == plan  # kept in plan.json: not timed again


def test_sweep_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"runs": [{"name": "a", "evals": [{"protocol": "probe"}]}]}))
    with pytest.raises(ConfigError, match=r"protocol='probe'; one of knn, linprobe, finetune"):
        load_sweep(bad)
    sweep_file = write_sweep(tmp_path / "sweep.yaml")
    assert main(["sweep", str(sweep_file), "--output", str(tmp_path / "o"), "--scale", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maelab: error:") and "unknown --scale 'huge'" in err and "\n" not in err


def write_scaled_sweep(path):
    """A sweep whose cpu scale sets the model for every run, and a Swin run that keeps its own at that scale."""
    spec = {
        "pretrain": {"model": "mae_vit_pico_patch4_32", "epochs": 2},
        "evals": [{"protocol": "knn"}],
        "scales": {
            "cpu": {"pretrain": {"model": "mae_vit_tiny_patch4_32", "batch_size": 8}},
            "gpu": {"pretrain": {"epochs": 50, "batch_size": 64}},
        },
        "runs": [
            {"name": "vit"},
            {
                "name": "swin",
                "pretrain": {"method": "simmim", "model": "swin_tiny_patch2_window4_32", "epochs": 5},
                "scales": {"cpu": {"pretrain": {"model": "swin_pico_patch2_window4_32", "data": {"max_samples": 100}}}},
            },
        ],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_runs_own_scale_overrides_win_over_the_scales_and_show_in_its_overrides(tmp_path):
    from maelab.sweep import collect_rows

    sweep = load_sweep(write_scaled_sweep(tmp_path / "sweep.yaml"), "cpu", None)
    vit, swin = sweep.runs
    assert vit.pretrain["model"] == "mae_vit_tiny_patch4_32"  # the scale's model for a run without its own
    assert swin.pretrain["model"] == "swin_pico_patch2_window4_32"  # the run's at this scale beats the scale's
    assert swin.pretrain["data.max_samples"] == 100 and swin.pretrain["batch_size"] == 8
    assert swin.own == {
        "method": "simmim",
        "model": "swin_pico_patch2_window4_32",
        "epochs": 5,
        "data.max_samples": 100,
    }
    rows = collect_rows(sweep, tmp_path / "out")  # no run directories: only the run's settings are filled
    shown = set(rows[1]["overrides"].split())
    assert shown == {"model=swin_pico_patch2_window4_32", "epochs=5", "data.max_samples=100"}


def test_a_runs_scale_overrides_apply_only_at_that_scale(tmp_path):
    path = write_scaled_sweep(tmp_path / "sweep.yaml")
    vit, swin = load_sweep(path, "gpu", None).runs  # the run has no entry for gpu: the scale's and base values
    assert vit.pretrain["model"] == "mae_vit_pico_patch4_32" and vit.pretrain["epochs"] == 50
    assert swin.pretrain["model"] == "swin_tiny_patch2_window4_32"
    assert swin.pretrain["epochs"] == 50 and swin.pretrain["batch_size"] == 64  # the scale's over the run's
    assert "data.max_samples" not in swin.pretrain
    assert swin.own == {"method": "simmim", "model": "swin_tiny_patch2_window4_32", "epochs": 5}
    vit, swin = load_sweep(path, None, None).runs  # no scale
    assert vit.pretrain == {"model": "mae_vit_pico_patch4_32", "epochs": 2}
    assert swin.pretrain == {"model": "swin_tiny_patch2_window4_32", "epochs": 5, "method": "simmim"}
    assert swin.own == {"method": "simmim", "model": "swin_tiny_patch2_window4_32", "epochs": 5}


def test_an_unknown_run_key_lists_scales_as_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"runs": [{"name": "a", "scale": {"cpu": {"model": "x"}}}]}))
    allowed = "allowed: name, pretrain, evals, tokenizer, scales"
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) \['scale'\]; {allowed}"):
        load_sweep(bad, None, None)


def test_a_runs_scale_takes_pretrain_and_names_a_scale_of_the_sweep(tmp_path):
    flat = tmp_path / "flat.yaml"  # pretrain keys straight under the scale: the sweep-level form is nested
    flat.write_text(yaml.safe_dump({"scales": {"cpu": {}}, "runs": [{"name": "a", "scales": {"cpu": {"model": "x"}}}]}))
    with pytest.raises(
        ConfigError, match=r"runs\[0\]\.scales\.cpu has unknown key\(s\) \['model'\]; allowed: pretrain"
    ):
        load_sweep(flat, "cpu", None)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"scales": {"cpu": {}}, "runs": [{"name": "a", "scales": {"cpuu": {}}}]}))
    with pytest.raises(ConfigError, match=r"runs\[0\]\.scales\.cpuu: not a scale of this sweep"):
        load_sweep(typo, "cpu", None)


def test_methods_sweep_keeps_the_swin_model_and_averages_its_tokens_at_cpu_scale():
    from tests.conftest import REPO

    run = next(r for r in load_sweep(REPO / "sweeps" / "methods.yaml", "cpu", None).runs if r.name == "simmim_swin")
    pools = {ev.protocol: ev.overrides.get("pool") for ev in run.evals}
    assert run.pretrain["model"] == "swin_pico_patch2_window4_32" and pools == {"knn": "avg", "linprobe": "avg"}
