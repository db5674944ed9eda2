"""``maelab bench``: train-step images/s, step time, peak memory, FLOPs/image and MFU.

Our step is the real training step (:class:`maelab.engine.step.TrainStep`: autocast forward,
backward, AdamW update). When ``transformers`` is importable, Hugging Face
``ViTMAEForPreTraining`` (SDPA attention) runs in the same process at the same batch and
dtype as the reference. Timings are medians over steps after warm-up (CUDA events on GPU).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch

from maelab.bench.hf_reference import build_hf_mae, hf_available, hf_loss
from maelab.bench.measure import (
    count_flops,
    environment_info,
    measure_matmul_peak,
    peak_memory,
    reset_peak_memory,
    summarize,
    synchronize,
    time_steps,
)
from maelab.config import ModelConfig, on_off, to_dict
from maelab.engine.accel import compile_or_eager, convert_to_fp8, resolve_compile, uses_cudagraphs
from maelab.engine.optim import build_adamw
from maelab.engine.runtime import autocast, resolve_device, resolve_precision
from maelab.errors import ConfigError
from maelab.io import write_json
from maelab.methods import pretrain_step
from maelab.models.mae import MaskedAutoencoder
from maelab.models.registry import get_config

log = logging.getLogger(__name__)

LR = 1e-4
REFERENCE = "hf_vitmae_sdpa"


def _measure(
    name: str,
    step: Callable[[], None],
    flops_fn: Callable[[], Any] | None,
    batch_size: int,
    warmup: int,
    steps: int,
    device: torch.device,
    peak_flops: float,
    flops: int | None = None,
) -> dict[str, Any]:
    """Time ``step``; FLOPs from ``flops`` or by counting one call of ``flops_fn``."""
    if flops is None:
        assert flops_fn is not None
        flops = count_flops(flops_fn)
    reset_peak_memory(device)
    times = time_steps(step, warmup, steps, device)
    result: dict[str, Any] = {"name": name, **summarize(times, batch_size)}
    result["peak_memory_gb"] = peak_memory(device) / 2**30
    result["flops_per_image"] = flops / batch_size
    step_s = result["step_ms_median"] / 1e3
    result["achieved_tflops"] = flops / step_s / 1e12
    result["mfu"] = flops / step_s / peak_flops if peak_flops > 0 else None
    return result


@dataclass(frozen=True)
class Variant:
    """One way of running our train step, for the speed table and its ablations."""

    compile: str = "auto"
    """auto (on for CUDA), on, off (engine.accel.resolve_compile)."""
    compile_mode: str = "default"
    fused_adamw: bool | None = None
    """None: fused when the parameters are on CUDA (training's default); False: foreach AdamW."""
    fp8: str = "off"
    host_sync: bool = False
    """Read the loss on the host after every step (what training avoids)."""


VARIANTS: dict[str, Variant] = {
    "eager": Variant(compile="off"),
    "eager-foreach-adamw": Variant(compile="off", fused_adamw=False),
    "eager-host-sync": Variant(compile="off", host_sync=True),
    "compile": Variant(compile="on"),
    "compile-cudagraphs": Variant(compile="on", compile_mode="reduce-overhead"),
    "compile-autotune": Variant(compile="on", compile_mode="max-autotune-no-cudagraphs"),
    "fp8": Variant(compile="on", fp8="tensorwise"),
    "fp8-rowwise": Variant(compile="on", fp8="rowwise"),
    "fp8-cudagraphs": Variant(compile="on", compile_mode="reduce-overhead", fp8="tensorwise"),
}
"""Named ablations for ``maelab bench --variants``: each changes one thing of the CUDA default path
(compiled, fused AdamW, no host sync), of ``eager``, or of the variant its name extends
(``eager-foreach-adamw`` = eager + foreach AdamW, ``fp8-cudagraphs`` = fp8 + CUDA graphs)."""


def _ours(
    cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype, variant: Variant
) -> Callable[[], None]:
    model = MaskedAutoencoder(cfg).to(device).train()
    convert_to_fp8(model, variant.fp8, device)
    optimizer = build_adamw(model, LR, fused=variant.fused_adamw)
    forward, compiled, eager_fallback = compile_or_eager(model, variant.compile, device, variant.compile_mode)
    stepper = pretrain_step(
        model,
        optimizer,
        device,
        dtype,
        forward=forward,
        cudagraphs=uses_cudagraphs(compiled, variant.compile_mode),
        eager_fallback=eager_fallback,
    )
    imgs = torch.randn(batch_size, cfg.in_chans, *model.img_hw, device=device)

    def step() -> None:
        loss = stepper([imgs], LR)
        if variant.host_sync:
            loss.item()

    return step


def _our_flops(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> int:
    """Model FLOPs of one eager forward + backward (the same for every variant: MFU counts model work)."""
    model = MaskedAutoencoder(cfg).to(device).train()
    imgs = torch.randn(batch_size, cfg.in_chans, *model.img_hw, device=device)

    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = model(imgs).loss
        loss.backward()

    return count_flops(fwd_bwd)


def _reference(
    cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[], None], Callable[[], Any]]:
    model = build_hf_mae(cfg).to(device).train()
    optimizer = build_adamw(model, LR)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    imgs = torch.randn(
        batch_size,
        cfg.in_chans,
        *((cfg.img_size,) * 2 if isinstance(cfg.img_size, int) else cfg.img_size),
        device=device,
    )

    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = hf_loss(model, imgs)
        scaler.scale(loss).backward()

    def step() -> None:
        fwd_bwd()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def count() -> None:
        fwd_bwd()
        optimizer.zero_grad(set_to_none=True)

    return step, count


def _free(device: torch.device) -> None:
    """Drop what the last measurement left: compiled graphs, cached blocks."""
    torch._dynamo.reset()  # first: what only the compiled graphs referenced becomes collectable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _guarded(name: str, batch_size: int, device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a CUDA out-of-memory becomes a row that says so (batch sweeps hit it)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        log.warning("%s at batch %d: out of memory", name, batch_size)
        return {"name": name, "batch_size": batch_size, "oom": True}
    finally:
        _free(device)


def _measure_batch(
    cfg: ModelConfig,
    bs: int,
    dev: torch.device,
    dtype: torch.dtype,
    variants: dict[str, Variant],
    reference: bool,
    warmup: int,
    steps: int,
    peak: float,
) -> list[dict[str, Any]]:
    """Our variants and (optionally) the HF reference at one batch size; ratios against the
    reference and against our eager variant when both ran."""
    rows: list[dict[str, Any]] = []
    flops: list[int] = []

    def ours(name: str, variant: Variant) -> dict[str, Any]:
        if not flops:
            flops.append(_our_flops(cfg, bs, dev, dtype))
            _free(dev)
        torch.manual_seed(0)
        step = _ours(cfg, bs, dev, dtype, variant)
        row = _measure(name, step, None, bs, warmup, steps, dev, peak, flops=flops[0])
        row.update(batch_size=bs, variant=dataclasses.asdict(variant))
        return row

    measured: dict[Variant, dict[str, Any]] = {}
    for name, variant in variants.items():
        resolved = dataclasses.replace(variant, compile="on" if resolve_compile(variant.compile, dev) else "off")
        if resolved in measured and not measured[resolved].get("oom"):  # the same path: not timed twice
            rows.append({**measured[resolved], "name": name, "same_as": measured[resolved]["name"]})
            continue
        rows.append(_guarded(name, bs, dev, partial(ours, name, variant)))
        measured[resolved] = rows[-1]
    if reference:

        def ref() -> dict[str, Any]:
            step, count = _reference(cfg, bs, dev, dtype)
            return {**_measure(REFERENCE, step, count, bs, warmup, steps, dev, peak), "batch_size": bs}

        rows.append(_guarded(REFERENCE, bs, dev, ref))
    by_name = {r["name"]: r for r in rows if not r.get("oom")}
    for r in rows:
        if r.get("oom") or r["name"] == REFERENCE:
            continue
        if REFERENCE in by_name:
            r["speedup_vs_reference"] = r["img_per_s"] / by_name[REFERENCE]["img_per_s"]
        if "eager" in by_name and r["name"] != "eager":
            r["speedup_vs_eager"] = r["img_per_s"] / by_name["eager"]["img_per_s"]
    return rows


def resolve_variants(names: Sequence[str] | None, default: Variant) -> dict[str, Variant]:
    """``maelab`` (the configured default path) plus the named ablations (see VARIANTS)."""
    out = {"maelab": default}
    for name in names or []:
        if name not in VARIANTS:
            raise ConfigError(f"invalid --variants entry {name!r}: use any of {', '.join(VARIANTS)}")
        out[name] = VARIANTS[name]
    return out


def run_bench(
    model: str | None = None,
    batch_size: int | None = None,
    steps: int = 20,
    warmup: int = 5,
    device: str = "auto",
    precision: str = "auto",
    compile: str | bool = "auto",
    compile_mode: str = "default",
    fp8: str = "off",
    variants: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    reference: bool = True,
    json_path: str | None = None,
    model_args: dict[str, Any] | None = None,
    quiet: bool = False,
    data: str | None = None,
    num_workers: int | None = None,
    gpu_resident: str = "auto",
    data_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark our train step as configured (``compile``, ``compile_mode``, ``fp8``: the
    training defaults), any named ablation ``variants``, and the HF reference, at ``batch_size``
    or each of ``batch_sizes``; with ``data`` also the loader and the end-to-end loop. Prints a
    table, optionally writes JSON."""
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    name = model or ("mae_vit_base_patch16" if dev.type == "cuda" else "mae_vit_pico_patch4_32")
    sizes = list(batch_sizes or [batch_size or (256 if dev.type == "cuda" else 8)])
    cfg = get_config(name, **(model_args or {}))
    square = not isinstance(cfg.img_size, tuple) or cfg.img_size[0] == cfg.img_size[1]
    if reference and hf_available() and not square:
        log.warning("skipping the Hugging Face reference: it supports square images only")
    use_ref = reference and hf_available() and square
    default = Variant(compile=on_off(compile), compile_mode=compile_mode, fp8=fp8)
    chosen = resolve_variants(variants, default)
    peak = measure_matmul_peak(dev, torch.bfloat16 if dtype != torch.float32 else torch.float32)
    results: list[dict[str, Any]] = []
    for bs in sizes:
        results += _measure_batch(cfg, bs, dev, dtype, chosen, use_ref, warmup, steps, peak)
    if data is not None:
        results += run_data_bench(
            data,
            name,
            sizes[0],
            steps=max(steps, 20),
            warmup=warmup,
            device=device,
            num_workers=num_workers,
            gpu_resident=gpu_resident,
            model_args=model_args,
            data_args=data_args,
            compile=compile,
            compile_mode=compile_mode,
            fp8=fp8,
        )
    report = {
        "command": " ".join(["maelab", *sys.argv[1:]]) if sys.argv and "maelab" in sys.argv[0] else None,
        "model": name,
        "model_config": to_dict(cfg),
        "batch_sizes": sizes,
        "precision": str(dtype).removeprefix("torch."),
        "default_variant": dataclasses.asdict(default),
        "compiled": resolve_compile(default.compile, dev),
        "steps": steps,
        "warmup": warmup,
        "matmul_peak_tflops": peak / 1e12,
        "environment": environment_info(dev),
        "results": results,
        "best": best_per_impl(results),
    }
    if not quiet:
        print(format_table(report))
    if json_path:
        write_json(report, json_path)
    return report


def best_per_impl(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each implementation/variant: the batch size with the highest images/s."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.get("oom") or r["name"].startswith("data:"):
            continue
        if r["name"] not in best or r["img_per_s"] > best[r["name"]]["img_per_s"]:
            best[r["name"]] = {"batch_size": r["batch_size"], "img_per_s": r["img_per_s"]}
    return best


def format_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    sizes = ", ".join(str(b) for b in report["batch_sizes"])
    path = "torch.compile" if report["compiled"] else "eager"
    lines = [
        f"{report['model']}  batch {sizes}  {report['precision']}  on "
        f"{env.get('device_name', env.get('device', '?'))}  (measured matmul peak "
        f"{report['matmul_peak_tflops']:.1f} TFLOP/s; maelab = the default path: {path})",
        f"{'impl':<22}{'batch':>6}{'img/s':>10}{'step ms':>10}{'peak GB':>10}{'GFLOP/img':>11}{'MFU':>8}"
        f"{'vs ref':>8}{'vs eager':>9}",
    ]
    for r in report["results"]:
        if r["name"].startswith("data:"):
            where = (
                "GPU-resident"
                if r["gpu_resident"]
                else f"{r['num_workers']} workers, {r.get('decode') or 'cpu'} decode"
            )
            lines.append(
                f"{r['name']:<22}{r['batch_size']:>6}{r['img_per_s']:>10.1f}{r['step_ms_median']:>10.1f}   ({where})"
            )
            continue
        if r.get("oom"):
            lines.append(f"{r['name']:<22}{r['batch_size']:>6}   out of memory")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        vs_eager = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
        lines.append(
            f"{r['name']:<22}{r['batch_size']:>6}{r['img_per_s']:>10.1f}{r['step_ms_median']:>10.1f}"
            f"{r['peak_memory_gb']:>10.2f}{r['flops_per_image'] / 1e9:>11.2f}{mfu:>8}{ratio:>8}{vs_eager:>9}"
        )
    if len(report["batch_sizes"]) > 1:
        lines.append(
            "best batch: "
            + "; ".join(f"{k} {v['batch_size']} ({v['img_per_s']:.0f} img/s)" for k, v in report["best"].items())
        )
    return "\n".join(lines)


def run_data_bench(
    data: str,
    model: str,
    batch_size: int,
    steps: int = 50,
    warmup: int = 5,
    device: str = "auto",
    num_workers: int | None = None,
    gpu_resident: str = "auto",
    model_args: dict[str, Any] | None = None,
    data_args: dict[str, Any] | None = None,
    compile: str | bool = "auto",
    compile_mode: str = "default",
    fp8: str = "off",
) -> list[dict[str, Any]]:
    """Loader-only and end-to-end (loader + real train step) images/s of a pre-training setup.

    Builds a real :func:`~maelab.engine.pretrain.pretraining_loop` (in a temporary run directory)
    and times ``steps`` batches after ``warmup``; the clock stops after a device sync.
    """
    import tempfile
    import time

    from maelab.config import PretrainConfig, build_config
    from maelab.data.jpeg_gpu import resolve_decode
    from maelab.engine.pretrain import Pretraining, pretraining_loop

    overrides: dict[str, Any] = {
        "model": model,
        "batch_size": batch_size,
        "device": device,
        "epochs": 1,
        "warmup_epochs": 0,
        "data.name": data,
        "data.gpu_resident": gpu_resident,
        "compile": compile,
        "compile_mode": compile_mode,
        "fp8": fp8,
        **{f"model_args.{k}": v for k, v in (model_args or {}).items()},
        **{f"data.{k}": v for k, v in (data_args or {}).items()},
    }
    if num_workers is not None:
        overrides["data.num_workers"] = num_workers
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides["output"] = tmp
        loop = pretraining_loop(build_config(PretrainConfig, None, overrides), progress=False)
        data_path, run_device = cast(Pretraining, loop.p).data, loop.ctx.device
        for mode in ("loader", "end_to_end"):
            data_path.sampler.set_epoch(0)
            batches = iter(data_path.loader)
            needed = min(warmup + steps, len(data_path.loader))
            if needed <= warmup:
                raise ValueError(f"{data}: only {len(data_path.loader)} batches of {batch_size}: too few to time")
            t0 = 0.0
            for i in range(needed):
                if i == warmup:
                    synchronize(run_device)
                    t0 = time.perf_counter()
                imgs, _ = next(batches)
                if mode == "end_to_end":
                    loop.train_step([imgs])
                else:
                    imgs = imgs.to(run_device, non_blocking=True)
            synchronize(run_device)  # device, not the current one (cuda:N)
            elapsed = time.perf_counter() - t0
            timed = needed - warmup
            results.append(
                {
                    "name": f"data:{mode}",
                    "img_per_s": timed * batch_size / elapsed,
                    "step_ms_median": 1e3 * elapsed / timed,
                    "gpu_resident": data_path.gpu_resident,
                    "num_workers": loop.cfg.data.num_workers,
                    "data": data,
                    "batch_size": batch_size,
                    "decode": None if data_path.gpu_resident else resolve_decode(loop.cfg.data.decode),
                }
            )
            del batches
    return results
