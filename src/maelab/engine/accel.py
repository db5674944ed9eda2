"""Speed switches of the training step: ``torch.compile`` (with its CUDA-graph mode) and opt-in FP8.

- ``compile``: auto (on for CUDA, off elsewhere), on, off. Compiling changes how the step is
  computed (fused kernels), not what: tests/engine/test_compile.py checks compiled == eager.
- ``compile_mode``: torch.compile's mode. ``reduce-overhead`` replays the forward and backward
  as CUDA graphs (one launch per graph instead of one per kernel: what small models at 32 px
  need); ``max-autotune*`` also searches matmul kernels (long first compile).
- ``fp8``: off (default), tensorwise or rowwise: torchao's float8 training for the Linear layers
  of the transformer blocks (Hopper/Ada GPUs). It changes the arithmetic, so it is opt-in and only
  counts with evidence that it learns the same (see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from maelab.config import COMPILE_MODES, FP8_RECIPES, SWITCHES, on_off
from maelab.errors import ConfigError, error_summary

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
"""float8 matmuls need Ada (8.9) or Hopper (9.0) and newer."""
FP8_BLOCK_PREFIXES = ("encoder.blocks.", "decoder_blocks.")
"""Only the Linear layers inside transformer blocks go to fp8: the patch embedding, the decoder's
input projection and its pixel head (first and last layers) stay in bf16."""
FP8_SWIN_BLOCK = re.compile(r"^encoder\.layers\.\d+\.blocks\.")
"""A Swin encoder's blocks (its patch mergings stay in bf16)."""


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """Whether to torch.compile: ``auto`` is on for CUDA only (inductor on CPU is slow to compile
    and brings little there)."""
    setting = on_off(setting)
    if setting not in SWITCHES:
        raise ConfigError(f"invalid compile={setting!r}: use auto, on or off")
    return device.type == "cuda" if setting == "auto" else setting == "on"


def compile_module(module: nn.Module, mode: str = "default") -> Callable[..., Any]:
    """``torch.compile(module)`` with static shapes (every training batch has the same size, so a
    different size recompiles instead of switching to slower dynamic-shape kernels)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"invalid compile_mode={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)


def uses_cudagraphs(compiled: bool, mode: str) -> bool:
    """Whether a compiled module replays CUDA graphs (torch.compile's reduce-overhead and max-autotune)."""
    return compiled and mode in ("reduce-overhead", "max-autotune")


def is_compile_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.compile itself (dynamo tracing, inductor codegen, a C++/Triton
    compiler), not from the model."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(err, TorchDynamoException) or type(err).__module__.startswith(
        ("torch._dynamo", "torch._inductor")
    )


def describe_compile_failure(err: BaseException) -> str:
    """One line naming a torch.compile failure: its type and the first sentence of its message."""
    return f"torch.compile failed on this machine ({error_summary(err)})"


def compile_failure_error(err: BaseException) -> ConfigError:
    """compile=on: the one-line error that says how to run without torch.compile."""
    return ConfigError(f"{describe_compile_failure(err)}; rerun with compile=off (--no-compile) to train eagerly")


def warn_compile_fallback(err: BaseException) -> None:
    """compile=auto: one warning line naming the failure; the caller goes on eagerly."""
    log.warning(
        "%s; compile=auto: running eagerly instead (compile=on makes this an error, compile=off skips compiling)",
        describe_compile_failure(err),
    )


class Forward(NamedTuple):
    """What a training step calls: ``fn`` (compiled or the module itself); ``eager_fallback``: the module to run
    instead if the first compiled step fails (compile=auto only, else None)."""

    fn: Callable[..., Any]
    compiled: bool
    eager_fallback: nn.Module | None


def compile_or_eager(module: nn.Module, setting: str | bool, device: torch.device, mode: str = "default") -> Forward:
    """``module``, torch.compiled when ``setting`` (auto/on/off) resolves to on for ``device``.

    A failure of ``torch.compile`` itself is a one-line ConfigError with compile=on; with auto it is a warning and
    the module runs eagerly. A failure at the first compiled call is handled by the step (``eager_fallback``)."""
    if not resolve_compile(setting, device):
        return Forward(module, False, None)
    try:
        fn = compile_module(module, mode)
    except ConfigError:
        raise
    except Exception as e:  # nothing of the model has run yet: any error here is torch.compile's
        if on_off(setting) != "auto":
            raise compile_failure_error(e) from e
        warn_compile_fallback(e)
        return Forward(module, False, None)
    return Forward(fn, True, module if on_off(setting) == "auto" else None)


@contextlib.contextmanager
def explain_compile_failure(active: bool) -> Iterator[None]:
    """Turn a torch.compile failure into a one-line ConfigError that says how to run without it."""
    try:
        yield
    except Exception as e:
        if active and is_compile_failure(e):
            raise compile_failure_error(e) from e
        raise


def is_fp8_candidate(module: nn.Module, fqn: str) -> bool:
    """A Linear inside a transformer block whose both dims are multiples of 16 (float8 matmul tiles)."""
    return (
        isinstance(module, nn.Linear)
        and (fqn.startswith(FP8_BLOCK_PREFIXES) or FP8_SWIN_BLOCK.match(fqn) is not None)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_fp8(model: nn.Module, recipe: str, device: torch.device) -> int:
    """Swap the block Linears of ``model`` for torchao ``Float8Linear`` in place; returns how many.

    The weights stay in their own dtype and under the same state-dict keys, so checkpoints load
    into a plain model and back. On CPU torchao emulates the float8 matmul (tests only, slow)."""
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"invalid fp8={recipe!r}: use one of {', '.join(FP8_RECIPES)}")
    if recipe == "off":
        return 0
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(
            "fp8 needs torchao, which is not installed: pip install 'maelab[fp8]' (or set fp8=off)"
        ) from e
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise ConfigError(
                f"invalid fp8={recipe!r}: float8 matmuls need a GPU of compute capability 8.9 or "
                f"newer (Ada, Hopper), this one is {cap[0]}.{cap[1]}; set fp8=off"
            )
    elif device.type != "cpu":
        raise ConfigError(
            f"invalid fp8={recipe!r}: float8 training runs on CUDA (and emulated on CPU), "
            f"not on {device.type}; set fp8=off"
        )
    count = sum(1 for fqn, m in model.named_modules() if is_fp8_candidate(m, fqn))
    if count == 0:
        raise ConfigError(f"fp8={recipe!r}: no Linear layer of this model has dims divisible by 16; set fp8=off")
    # torch._scaled_mm on CUDA needs the inner dim of each matmul divisible by 16; for the weight gradient
    # that is batch x tokens (the decoder's 1 + L is odd for even L): pad it with zeros where it is not
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)
    convert_to_float8_training(model, config=config, module_filter_fn=is_fp8_candidate)
    if device.type == "cpu":
        log.warning("fp8 on CPU is emulated by torchao: for tests only, it is slow")
    return count
