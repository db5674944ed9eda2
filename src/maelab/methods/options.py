"""The options of the pre-training methods (``method_args``): one frozen dataclass per method, its defaults the
method's paper settings, its values checked on construction (a one-line ConfigError naming the key).

The masking ratio, masking type, target and ``norm_pix_loss`` are the model's (:class:`~maelab.config.ModelConfig`,
``model_args``); a method's changes to their defaults are its registry entry's ``model_defaults``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maelab.errors import ConfigError

LOSSES = ("l1", "mse")
"""l1: SimMIM's mean absolute error over the hidden pixels; mse: the mean squared error over the hidden patches."""


def option_error(key: str, value: Any, allowed: str) -> ConfigError:
    """``invalid method_args.<key>=<value>: <allowed>`` (one line)."""
    return ConfigError(f"invalid method_args.{key}={value!r}: {allowed}")


@dataclass(frozen=True)
class MaskedEncoderOptions:
    """Options of a masked encoder (:class:`maelab.methods.masked_encoder.MaskedEncoder`)."""

    loss: str = "mse"
    """l1 (SimMIM: mean absolute error over the hidden pixels) or mse (MaskFeat: over the hidden patches)."""
    mask_unit: int | str | None = None
    """Side in pixels of the square units masked together (SimMIM's ``mask_patch_size``; a multiple of the
    patch size dividing the image), ``"auto"`` (32 px scaled down for small images, see
    :func:`maelab.methods.masked_encoder.resolve_mask_unit`), or None: the model's own ``mask_type`` per patch."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise option_error("loss", self.loss, "one of " + ", ".join(LOSSES))
        unit = self.mask_unit
        if not (unit is None or unit == "auto" or (isinstance(unit, int) and not isinstance(unit, bool) and unit > 0)):
            raise option_error("mask_unit", unit, 'a positive number of pixels, "auto" or null')


@dataclass(frozen=True)
class SimMIMOptions(MaskedEncoderOptions):
    """SimMIM (Xie et al. 2022): L1 on the hidden pixels, random masking of 32 px units."""

    loss: str = "l1"
    mask_unit: int | str | None = "auto"


@dataclass(frozen=True)
class MaskFeatOptions(MaskedEncoderOptions):
    """MaskFeat (Wei et al. 2022): MSE on the hidden patches' HOG features, per-patch (block) masking."""

    loss: str = "mse"
    mask_unit: int | str | None = None


@dataclass(frozen=True)
class VAEOptions:
    """Options of the variational autoencoder baseline."""

    beta: float = 1.0
    """Weight of the KL term: loss = reconstruction MSE + beta * KL (a finite number >= 0)."""

    def __post_init__(self) -> None:
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
            raise option_error("beta", beta, "a finite number >= 0")
        object.__setattr__(self, "beta", float(beta))


@dataclass(frozen=True)
class BEiTOptions:
    """Options of BEiT (Bao et al. 2022): the visual tokenizer whose codes are the targets."""

    tokenizer: str | None = None
    """The frozen tokenizer (required): a ``maelab tokenizer`` run directory or its .pt checkpoint. Kept as an
    absolute path, so a BEiT checkpoint's method_args find it from any working directory."""

    def __post_init__(self) -> None:
        path = self.tokenizer
        if not isinstance(path, str) or not path:
            raise option_error(
                "tokenizer", path, "the path of a `maelab tokenizer` run directory or checkpoint (required)"
            )
        object.__setattr__(self, "tokenizer", str(Path(path).expanduser().absolute()))
