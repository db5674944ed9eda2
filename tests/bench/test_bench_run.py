"""``maelab bench`` orchestration: ablation variants, batch sweeps, OOM rows, best batch."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS, error_line

from maelab.bench import run as bench_run
from maelab.bench.run import VARIANTS, Variant, best_per_impl, resolve_variants, run_bench
from maelab.errors import ConfigError


def _changed(a: Variant, b: Variant) -> set[str]:
    return {f for f in ("compile", "compile_mode", "fused_adamw", "fp8", "host_sync") if getattr(a, f) != getattr(b, f)}


def test_variants_each_change_one_thing():
    """Each ablation is one change away from the CUDA default (compiled), from eager, or from the
    variant its name extends (fp8-cudagraphs = fp8 + CUDA graphs)."""
    cuda_default = Variant(compile="on")
    for name, v in VARIANTS.items():
        bases = [cuda_default, VARIANTS["eager"]]
        bases += [VARIANTS[name[:i]] for i in range(len(name)) if name[i] == "-" and name[:i] in VARIANTS]
        assert any(len(_changed(v, base)) == 1 for base in bases), (name, [_changed(v, b) for b in bases])
        assert v.compile in ("on", "off"), name  # a forced setting, the same on every device


def test_resolve_variants_rejects_unknown_names():
    assert list(resolve_variants(["eager", "compile"], Variant())) == ["maelab", "eager", "compile"]
    with pytest.raises(ConfigError, match="'turbo'.*eager"):
        resolve_variants(["turbo"], Variant())


def test_unknown_variant_is_one_line_cli_error(capsys):
    assert "turbo" in error_line(capsys, ["bench", "--device", "cpu", "--variants", "turbo", "--no-reference"])


def test_best_per_impl_skips_oom_and_data_rows():
    rows = [
        {"name": "maelab", "batch_size": 8, "img_per_s": 10.0},
        {"name": "maelab", "batch_size": 16, "img_per_s": 15.0},
        {"name": "maelab", "batch_size": 32, "oom": True},
        {"name": "hf", "batch_size": 8, "img_per_s": 12.0},
        {"name": "data:loader", "batch_size": 8, "img_per_s": 99.0},
    ]
    assert best_per_impl(rows) == {
        "maelab": {"batch_size": 16, "img_per_s": 15.0},
        "hf": {"batch_size": 8, "img_per_s": 12.0},
    }


@pytest.mark.slow  # 4 s; default: the other tests of run_bench here and tests/cli test_bench_on_cpu_writes_json
def test_sweep_with_variants_reports_ratios_and_survives_oom(monkeypatch):
    real_ours = bench_run._ours

    def ours_that_runs_out_at_16(cfg, bs, dev, dtype, variant):
        if bs == 16 and variant.host_sync:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_ours(cfg, bs, dev, dtype, variant)

    monkeypatch.setattr(bench_run, "_ours", ours_that_runs_out_at_16)
    report = run_bench(
        model="mae_vit_pico_patch4_32",
        batch_sizes=[8, 16],
        steps=2,
        warmup=1,
        device="cpu",
        variants=["eager", "eager-host-sync"],
        model_args=TINY_MODEL_ARGS,
        quiet=True,
    )
    rows = {(r["name"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(n, b) for n in ("maelab", "eager", "eager-host-sync", "hf_vitmae_sdpa") for b in (8, 16)}
    assert rows[("eager-host-sync", 16)] == {"name": "eager-host-sync", "batch_size": 16, "oom": True}
    eight = rows[("maelab", 8)]
    assert eight["speedup_vs_reference"] == pytest.approx(eight["img_per_s"] / rows[("hf_vitmae_sdpa", 8)]["img_per_s"])
    assert eight["speedup_vs_eager"] == pytest.approx(eight["img_per_s"] / rows[("eager", 8)]["img_per_s"])
    assert "speedup_vs_eager" not in rows[("eager", 8)]
    # every variant of one batch is charged the same model FLOPs (MFU counts model work)
    assert len({rows[(n, 8)]["flops_per_image"] for n in ("maelab", "eager", "eager-host-sync")}) == 1
    assert report["compiled"] is False and report["best"]["maelab"]["batch_size"] in (8, 16)
    assert "out of memory" in bench_run.format_table(report)


@pytest.mark.slow  # 5 s
def test_a_variant_equal_to_the_default_path_is_not_timed_twice(monkeypatch):
    calls = []
    real_ours = bench_run._ours
    monkeypatch.setattr(bench_run, "_ours", lambda *a: calls.append(a[-1]) or real_ours(*a))
    report = run_bench(
        model="mae_vit_pico_patch4_32",
        batch_size=8,
        steps=2,
        warmup=1,
        device="cpu",
        variants=["eager", "compile"],
        model_args=TINY_MODEL_ARGS,
        quiet=True,
        reference=False,
    )
    rows = {r["name"]: r for r in report["results"]}
    assert rows["eager"]["same_as"] == "maelab"  # on CPU the default path is eager
    assert rows["eager"]["img_per_s"] == rows["maelab"]["img_per_s"]
    assert len(calls) == 2 and "same_as" not in rows["compile"]
