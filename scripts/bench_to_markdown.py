"""Render ``maelab bench --json`` files as the Markdown tables of BENCHMARKS.md.

    python scripts/bench_to_markdown.py results/h100/*.json > /tmp/tables.md

One section per file: device, versions, commit and the command, then one row per measured
implementation/variant (batch, img/s, step ms, peak GB, GFLOP/img, MFU, vs HF, vs eager) and the
loader rows. Nothing is computed here that the JSON does not hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else ""


def _ratio(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else ""


def render(report: dict[str, Any], source: str) -> str:
    """One Markdown section for one bench report."""
    env = report["environment"]
    lines = [
        f"### {report['model']}, batch {', '.join(str(b) for b in report['batch_sizes'])}, {report['precision']} "
        f"({Path(source).name})",
        "",
        f"{env.get('device_name')} (capability {env.get('device_capability', '-')}); torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, timm {env.get('timm')}, transformers {env.get('transformers')}; maelab "
        f"{env.get('git_commit')}{' (dirty tree)' if env.get('git_dirty') else ''}; measured matmul peak "
        f"{report['matmul_peak_tflops']:.3g} TFLOP/s",
        "",
        f"`{report.get('command') or 'maelab bench (command not recorded)'}`",
        "",
        "| impl | batch | img/s | step ms | peak GB | GFLOP/img | MFU | vs HF | vs eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    data_rows = []
    for r in report["results"]:
        if r["name"].startswith("data:"):
            data_rows.append(r)
            continue
        if r.get("oom"):
            lines.append(f"| {r['name']} | {r['batch_size']} | out of memory | | | | | | |")
            continue
        name = r["name"] + (f" (= {r['same_as']})" if r.get("same_as") else "")
        lines.append(f"| {name} | {r['batch_size']} | {r['img_per_s']:.0f} | {r['step_ms_median']:.1f} | "
                     f"{r['peak_memory_gb']:.2f} | {r['flops_per_image'] / 1e9:.2f} | {_pct(r.get('mfu'))} | "
                     f"{_ratio(r.get('speedup_vs_reference'))} | {_ratio(r.get('speedup_vs_eager'))} |")
    if data_rows:
        lines += ["", "| data path | batch | img/s | ms per batch | loader |", "|---|---|---|---|---|"]
        for r in data_rows:
            where = "GPU-resident" if r["gpu_resident"] else f"{r['num_workers']} workers, {r.get('decode')} decode"
            lines.append(f"| {r['name'].removeprefix('data:')} | {r['batch_size']} | {r['img_per_s']:.0f} | "
                         f"{r['step_ms_median']:.1f} | {where} |")
    if len(report["batch_sizes"]) > 1 and report.get("best"):
        best = "; ".join(f"{k}: batch {v['batch_size']} ({v['img_per_s']:.0f} img/s)" for k, v in report["best"].items())
        lines += ["", f"Best batch: {best}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="maelab bench --json outputs")
    args = p.parse_args()
    print("\n".join(render(json.loads(Path(f).read_text()), f) for f in args.files))


if __name__ == "__main__":
    main()
