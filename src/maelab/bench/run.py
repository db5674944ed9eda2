"""``maelab bench``: train-step images/s, step time, peak memory, FLOPs/image and MFU.

Our step is the real training step (:class:`maelab.engine.step.TrainStep`: autocast forward,
backward, AdamW update). When ``transformers`` is importable, Hugging Face
``ViTMAEForPreTraining`` (SDPA attention) runs in the same process at the same batch and
dtype as the reference. Timings are medians over steps after warm-up (CUDA events on GPU).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from maelab.bench.hf_reference import build_hf_mae, hf_available, hf_loss
from maelab.bench.measure import (count_flops, environment_info, measure_matmul_peak, peak_memory,
                                  reset_peak_memory, summarize, time_steps)
from maelab.config import ModelConfig, to_dict
from maelab.engine.optim import build_adamw
from maelab.engine.runtime import autocast, resolve_device, resolve_precision
from maelab.engine.step import TrainStep
from maelab.models.mae import MaskedAutoencoder
from maelab.models.registry import get_config

log = logging.getLogger(__name__)

LR = 1e-4


def _measure(name: str, step: Callable[[], None], flops_fn: Callable[[], Any], batch_size: int,
             warmup: int, steps: int, device: torch.device, peak_flops: float) -> dict[str, Any]:
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


def _ours(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
          compile: bool) -> tuple[Callable[[], None], Callable[[], Any]]:
    model = MaskedAutoencoder(cfg).to(device).train()
    optimizer = build_adamw(model, LR)
    forward = torch.compile(model) if compile else model
    stepper = TrainStep(model, optimizer, device, dtype, forward=forward)
    imgs = torch.randn(batch_size, cfg.in_chans, *model.img_hw, device=device)

    def step() -> None:
        stepper([imgs], LR)

    def fwd_bwd() -> None:  # what FLOPs are counted on: the eager forward + backward
        with autocast(device, dtype):
            loss = model(imgs, noise=stepper.noise(batch_size)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd


def _reference(cfg: ModelConfig, batch_size: int, device: torch.device,
               dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], Any]]:
    model = build_hf_mae(cfg).to(device).train()
    optimizer = build_adamw(model, LR)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    imgs = torch.randn(batch_size, cfg.in_chans, *((cfg.img_size,) * 2 if isinstance(cfg.img_size, int)
                                                   else cfg.img_size), device=device)

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


def run_bench(model: str | None = None, batch_size: int | None = None, steps: int = 20, warmup: int = 5,
              device: str = "auto", precision: str = "auto", compile: bool = False, reference: bool = True,
              json_path: str | None = None, model_args: dict[str, Any] | None = None,
              quiet: bool = False, data: str | None = None, num_workers: int | None = None,
              gpu_resident: str = "auto") -> dict[str, Any]:
    """Benchmark our train step (and the HF reference, and with ``data`` the loader and the
    end-to-end loop); print a table, optionally write JSON."""
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    name = model or ("mae_vit_base_patch16" if dev.type == "cuda" else "mae_vit_pico_patch4_32")
    bs = batch_size or (256 if dev.type == "cuda" else 8)
    cfg = get_config(name, **(model_args or {}))
    peak = measure_matmul_peak(dev, torch.bfloat16 if dtype != torch.float32 else torch.float32)
    results = []
    torch.manual_seed(0)
    step, flops_fn = _ours(cfg, bs, dev, dtype, compile)
    results.append(_measure("maelab" + (" (compile)" if compile else ""), step, flops_fn, bs, warmup, steps, dev, peak))
    del step, flops_fn
    if reference and hf_available():
        square = not isinstance(cfg.img_size, tuple) or cfg.img_size[0] == cfg.img_size[1]
        if square:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            step, flops_fn = _reference(cfg, bs, dev, dtype)
            results.append(_measure("hf_vitmae_sdpa", step, flops_fn, bs, warmup, steps, dev, peak))
            results[0]["speedup_vs_reference"] = results[0]["img_per_s"] / results[1]["img_per_s"]
        else:
            log.warning("skipping the Hugging Face reference: it supports square images only")
    if data is not None:
        results += run_data_bench(data, name, bs, steps=max(steps, 20), warmup=warmup, device=device,
                                  num_workers=num_workers, gpu_resident=gpu_resident, model_args=model_args)
    report = {
        "command": " ".join(["maelab", *sys.argv[1:]]) if sys.argv and "maelab" in sys.argv[0] else None,
        "model": name, "model_config": to_dict(cfg), "batch_size": bs, "precision": str(dtype).removeprefix("torch."),
        "compile": compile, "steps": steps, "warmup": warmup, "matmul_peak_tflops": peak / 1e12,
        "environment": environment_info(dev), "results": results,
    }
    if not quiet:
        print(format_table(report))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"{report['model']}  batch {report['batch_size']}  {report['precision']}  on "
             f"{env.get('device_name', env.get('device', '?'))}  (measured matmul peak "
             f"{report['matmul_peak_tflops']:.1f} TFLOP/s)",
             f"{'impl':<20}{'img/s':>10}{'step ms':>10}{'peak GB':>10}{'GFLOP/img':>11}{'MFU':>8}{'vs ref':>8}"]
    for r in report["results"]:
        if r["name"].startswith("data:"):
            where = "GPU-resident" if r["gpu_resident"] else f"{r['num_workers']} workers"
            lines.append(f"{r['name']:<20}{r['img_per_s']:>10.1f}{r['step_ms_median']:>10.1f}   ({where})")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        lines.append(f"{r['name']:<20}{r['img_per_s']:>10.1f}{r['step_ms_median']:>10.1f}"
                     f"{r['peak_memory_gb']:>10.2f}{r['flops_per_image'] / 1e9:>11.2f}{mfu:>8}{ratio:>8}")
    return "\n".join(lines)


def run_data_bench(data: str, model: str, batch_size: int, steps: int = 50, warmup: int = 5, device: str = "auto",
                   num_workers: int | None = None, gpu_resident: str = "auto",
                   model_args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Loader-only and end-to-end (loader + real train step) images/s of a pre-training setup.

    Builds a real :class:`~maelab.engine.pretrain.Pretrainer` (in a temporary run directory)
    and times ``steps`` batches after ``warmup``; the clock stops after a device sync.
    """
    import tempfile
    import time

    from maelab.config import PretrainConfig, build_config
    from maelab.engine.pretrain import Pretrainer

    overrides: dict[str, Any] = {"model": model, "batch_size": batch_size, "device": device, "epochs": 1,
                                 "warmup_epochs": 0, "data.name": data, "data.gpu_resident": gpu_resident,
                                 **{f"model_args.{k}": v for k, v in (model_args or {}).items()}}
    if num_workers is not None:
        overrides["data.num_workers"] = num_workers
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides["output"] = tmp
        trainer = Pretrainer(build_config(PretrainConfig, None, overrides), progress=False)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for mode in ("loader", "end_to_end"):
            trainer.sampler.set_epoch(0)
            batches = iter(trainer.loader)
            needed = min(warmup + steps, len(trainer.loader))
            if needed <= warmup:
                raise ValueError(f"{data}: only {len(trainer.loader)} batches of {batch_size}: too few to time")
            t0 = 0.0
            for i in range(needed):
                if i == warmup:
                    sync()
                    t0 = time.perf_counter()
                imgs, _ = next(batches)
                if mode == "end_to_end":
                    trainer.train_step([imgs])
                else:
                    imgs = imgs.to(trainer.device, non_blocking=True)
            sync()
            elapsed = time.perf_counter() - t0
            timed = needed - warmup
            results.append({"name": f"data:{mode}", "img_per_s": timed * batch_size / elapsed,
                            "step_ms_median": 1e3 * elapsed / timed, "gpu_resident": trainer.gpu_resident,
                            "num_workers": trainer.cfg.data.num_workers, "data": data})
            del batches
    return results
