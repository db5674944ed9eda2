"""Activation memory without a GPU: bytes of the tensors autograd saves for backward, maelab vs HF ViTMAE.

Peak training memory is weights + gradients + optimizer state (the same for both) + the tensors
saved for backward + temporaries. This counts the saved tensors of one eager forward (each
storage once, parameters and buffers left out) on CPU, in fp32 or under bf16 autocast, with the
same noise (same masks) for both models:

    python scripts/saved_activations.py mae_vit_base_patch16 32 bf16
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch

import maelab
from maelab.bench.hf_reference import build_hf_mae
from maelab.models.registry import get_config


def saved_bytes(fn: Callable[[], torch.Tensor], model: torch.nn.Module) -> int:
    """Bytes of distinct storages saved for backward while ``fn`` runs, parameters/buffers excluded."""
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed:
            seen[(ptr, t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("batch_size", type=int)
    p.add_argument("precision", choices=["fp32", "bf16"])
    args = p.parse_args()
    cfg = get_config(args.model)
    torch.manual_seed(0)
    ours, hf = maelab.create_model(args.model), build_hf_mae(cfg)
    size = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
    imgs = torch.randn(args.batch_size, cfg.in_chans, size, size)
    noise = torch.rand(args.batch_size, cfg.num_patches)

    def ctx() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    with ctx():
        ours_b = saved_bytes(lambda: ours(imgs, noise=noise).loss, ours)
    with ctx():
        hf_b = saved_bytes(lambda: hf(pixel_values=imgs, noise=noise).loss, hf)
    print(f"{args.model} batch {args.batch_size} {args.precision}: saved for backward, parameters excluded: "
          f"maelab {ours_b / 2**20:.1f} MiB, HF ViTMAE {hf_b / 2**20:.1f} MiB, ratio {ours_b / hf_b:.3f}")


if __name__ == "__main__":
    main()
