"""scripts/bench_to_markdown.py renders a real bench report's rows, ratios and OOM rows."""

from __future__ import annotations

import pytest
from tests.conftest import TINY_MODEL_ARGS, load_script

from maelab.bench.run import run_bench


@pytest.mark.slow  # 3 s (a real CPU bench); scripts/bench_to_markdown.py only
def test_render_a_cpu_report():
    report = run_bench(
        model="mae_vit_pico_patch4_32",
        batch_sizes=[4, 8],
        steps=2,
        warmup=1,
        device="cpu",
        variants=["eager"],
        model_args=TINY_MODEL_ARGS,
        quiet=True,
    )
    report["results"].append({"name": "maelab", "batch_size": 4096, "oom": True})
    text = load_script("bench_to_markdown").render(report, "x.json")
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 7  # 3 impls x 2 batches + the OOM row
    ours = next(r for r in report["results"] if r["name"] == "maelab" and r["batch_size"] == 8)
    assert f"| maelab | 8 | {ours['img_per_s']:.0f} |" in text and f"{ours['speedup_vs_reference']:.2f}x" in text
    assert "| eager (= maelab) | 4 |" in text and "| maelab | 4096 | out of memory |" in text
    assert "Best batch:" in text and report["environment"]["torch"] in text
