"""torch.distributed glue: ``torchrun`` or ``srun`` environment, DDP, rank-0 I/O, metric all-reduce.

Launch with PyTorch's own launcher, e.g. ``torchrun --nproc_per_node 8 -m maelab pretrain ...``, or with
SLURM's alone, one task per GPU: ``srun --ntasks-per-node 8 python -m maelab pretrain ...``
(:mod:`maelab.engine.launch` maps SLURM's variables to torchrun's). The backend is NCCL on CUDA and
gloo on CPU. Without a launcher everything degrades to a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from maelab.engine.launch import adopt_slurm_launch, job_env

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """torchrun's variables are set (by torchrun, or by :func:`~maelab.engine.launch.adopt_slurm_launch`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group of a ``torchrun`` or ``srun`` launch (no-op for a single process)."""
    adopt_slurm_launch()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local)


def setup_process(device: str, precision: str) -> tuple[DistInfo, torch.device, torch.dtype]:
    """Join torchrun's or srun's process group (if any) and pick this rank's device and compute dtype.

    ``device``: auto, cpu, cuda, cuda:N; ``precision``: auto, bf16, fp16, fp32 (see engine.runtime)."""
    from maelab.engine.runtime import resolve_device, resolve_precision

    dev = resolve_device(device)
    info = init_distributed(dev.type)
    dev = device_for(info, dev)
    return info, dev, resolve_precision(precision, dev)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) under torchrun or srun."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def _all_reduce(value: torch.Tensor, info: DistInfo, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """A reduced copy of ``value`` over ranks (``value`` itself for a single process)."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of a tensor over ranks."""
    return _all_reduce(value, info, dist.ReduceOp.SUM)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks."""
    return _all_reduce(value, info, dist.ReduceOp.SUM) / info.world_size


def all_reduce_min(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Minimum of a tensor over ranks."""
    return _all_reduce(value, info, dist.ReduceOp.MIN)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cpu_group() -> dist.ProcessGroup | None:
    """A group of all ranks for collectives on CPU tensors: the default group (None) under gloo, else (NCCL)
    a new gloo group. A collective: every rank calls it."""
    if dist.get_backend() == "gloo":
        return None
    # every rank is a member, so this is never GroupMember.NON_GROUP_MEMBER
    return cast(dist.ProcessGroup, dist.new_group(backend="gloo"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun or srun launch, or a plain single process (from the environment alone)."""
    return int(job_env().get("RANK", "0")) == 0


def close_process_group() -> None:
    """Leave the process group a command joined under torchrun (nothing otherwise).

    All ranks meet at a barrier first: a rank that tears its connections down while another is
    still finishing (rank 0 writing the last checkpoint) can abort the other's transport threads."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- FSDP
def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """``module`` in ``DistributedDataParallel`` under torchrun (on ``device``'s index for CUDA), with its
    ``no_sync`` context (gradient accumulation); outside a process group ``(module, None)``."""
    if not info.enabled:
        return module, None
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, ddp.no_sync


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
    """FSDP2 (``fully_shard``): each transformer block is one unit, the rest is the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _is_dtensor(value: object) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_state_on_rank0(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``model.state_dict()`` and ``optimizer.state_dict()`` of an FSDP model, unsharded onto rank 0's CPU.

    A collective (every rank calls it): the DTensors are all-gathered one at a time and only rank 0
    keeps each full tensor, so the other ranks never hold the whole model or optimizer; they get two
    empty dicts. (torch.distributed.checkpoint's ``get_model_state_dict`` with ``full_state_dict=True,
    cpu_offload=True`` does the same, but cannot map the official key names of MaskedAutoencoder's
    state-dict hooks back to its modules.)"""
    keep = dist.get_rank() == 0
    model_sd = cast(dict, _gather(model.state_dict(), keep))
    optim_sd = cast(dict, _gather(optimizer.state_dict(), keep))
    return (model_sd, optim_sd) if keep else ({}, {})


def _gather(tree: object, keep: bool) -> object:
    """``tree`` (nested dicts/lists) with every tensor full and on the CPU where ``keep``, else None;
    each DTensor is all-gathered on every rank (a collective) and dropped right away where not kept."""
    if torch.is_tensor(tree):
        full = tree.full_tensor() if _is_dtensor(tree) else tree
        return full.cpu() if keep else None
    if isinstance(tree, dict):
        return {k: _gather(v, keep) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_gather(v, keep) for v in tree]
    return tree


def shard_like(full: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut full tensors into this rank's shards, laid out like ``sharded`` (same keys)."""
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        ref = sharded.get(key)
        if ref is not None and _is_dtensor(ref):
            out[key] = distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        else:
            out[key] = value
    return out


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, full_state: dict) -> None:
    """Load an unsharded optimizer state dict into an optimizer over FSDP-sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, entry in full_state["state"].items():
        p = params[int(idx)]
        new = {}
        for name, value in entry.items():
            if _is_dtensor(p) and torch.is_tensor(value) and value.shape == p.shape:
                new[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            else:
                new[name] = value
        state[idx] = new
    optimizer.load_state_dict({"state": state, "param_groups": full_state["param_groups"]})
