"""``maelab compare``: summary numbers and the figure from run directories."""

from __future__ import annotations

import json

import pytest
from tests.conftest import error_line

from maelab.cli import main
from maelab.viz.compare import load_run, summarize_run

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(d, losses, knn=None, epochs=2):
    d.mkdir(parents=True)
    steps = len(losses)
    with open(d / "steps.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "loss": loss, "lr": 1e-3, "img_per_s": 100.0}) + "\n")
    with open(d / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            rec = {
                "epoch": e,
                "step": e * steps // epochs,
                "loss": losses[e * steps // epochs - 1],
                "lr": 1e-3,
                "img_per_s": 90.0 + e,
            }
            if knn is not None:
                rec["knn_top1"] = knn[e - 1]
            f.write(json.dumps(rec) + "\n")
    return d


def test_summary_uses_the_tail_of_the_step_curve(tmp_path):
    losses = [1.0 - 0.01 * i for i in range(40)] + [0.5, 0.3, 0.5, 0.3]  # tail = last 10% = 5 values
    run = load_run(_write_run(tmp_path / "a", losses, knn=[20.0, 25.0]))
    row = summarize_run(run)
    assert row["final_loss"] == pytest.approx((0.61 + 0.5 + 0.3 + 0.5 + 0.3) / 5)
    assert row["final_loss_std"] > 0
    assert row["knn_top1_last"] == 25.0 and row["knn_top1_best"] == 25.0
    assert row["epochs"] == 2 and row["steps"] == 44 and row["img_per_s_median"] == pytest.approx(91.5)


def test_compare_cli_prints_table_and_writes_figure(tmp_path, capsys):
    a = _write_run(tmp_path / "x" / "run", [1.0, 0.8, 0.6, 0.5], knn=[10.0, 12.0])
    b = _write_run(tmp_path / "y" / "run", [1.0, 0.9, 0.7, 0.6])
    out, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--labels", "exact,fp8", "--output", str(out), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "exact" in text and "fp8" in text and "12.00" in text
    assert out.read_bytes()[:8] == PNG
    rows = json.loads(js.read_text())
    assert [r["name"] for r in rows] == ["exact", "fp8"] and rows[1]["knn_top1_last"] is None


def test_compare_errors_are_one_line(tmp_path, capsys):
    assert "metrics.jsonl is missing" in error_line(capsys, ["compare", str(tmp_path)])
    a = _write_run(tmp_path / "a", [1.0, 0.5])
    assert "2 names for 1 runs" in error_line(capsys, ["compare", str(a), "--labels", "one,two"])
