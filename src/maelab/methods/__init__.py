"""Pre-training methods: each turns images (and masking noise) into a loss and what the figures need.

A method is a :class:`Method` in :data:`METHODS`, selected by name: MAE, SimMIM, MaskFeat, the AE / VAE
baselines and BEiT (on the codes of a visual tokenizer, :mod:`maelab.methods.tokenizer`). Its model is an
``nn.Module`` with

- ``forward(imgs [B, C, H, W], noise=[B, L] | None) -> output`` whose ``loss`` is a scalar, ``pred`` [B, L, D]
  in target space (BEiT: [B, L] codes) and ``mask`` [B, L] bool (True = hidden; all False without masking) feed
  the figures;
- ``draw_noise(batch_size, device, generator=None, rows=None) -> [B, L]``: the masking noise the training loop
  draws (this rank's ``rows`` of the global batch's; see :mod:`maelab.methods.noise`), and ``noise_on_cpu``;
- ``cfg`` (a :class:`~maelab.config.ModelConfig`: masking type, ratio, target and patch grid) and ``encoder``
  (a timm ``VisionTransformer``: what fine-tuning, probing, kNN, embed and export use), ``forward_features``,
  ``encoder_state_dict()``;
- ``fsdp_units()``: the blocks FSDP shards one by one; ``no_weight_decay()``: token and position-embedding names.

A method's options (``method_args``) are a frozen dataclass (:mod:`maelab.methods.options`) read by
:func:`method_options`; its changes to the model's defaults (mask ratio, masking type, target) are
``model_defaults``, under the run's ``model_args`` (:func:`method_model_config`).

The training loop, the checkpoint format, export and the figures do not branch on the method: the
pre-training protocol asks the registry entry to build the model and to draw its figure. Adding a method
is one module (its model, or a wrapper around one) and one entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.methods.noise import MaskingNoise, masked_image_loss, pretrain_step
from maelab.methods.options import BEiTOptions, MaskedEncoderOptions, MaskFeatOptions, SimMIMOptions, VAEOptions


class Builder(Protocol):
    """(model config, the method's options or None for its defaults) -> the model."""

    def __call__(self, cfg: ModelConfig, options: Any = None, /) -> nn.Module: ...


@dataclass(frozen=True)
class Method:
    """A registered pre-training method."""

    name: str
    summary: str
    build: Builder
    """(ModelConfig, options from :func:`method_options`) -> the model (see the module docstring)."""
    figure: Callable[[ModelConfig, torch.Tensor, Any], dict[str, torch.Tensor] | None]
    """(model config, images [B, C, H, W], forward output) -> the reconstruction figure's images, or None when
    the method's prediction has no picture (e.g. HOG features)."""
    options: type | None = None
    """The dataclass of the method's ``method_args`` (its defaults are the method's), or None: no options."""
    model_defaults: Mapping[str, Any] = field(default_factory=dict)
    """``model_args`` the method sets unless the run sets them (e.g. SimMIM's mask ratio 0.6)."""
    figure_note: str | None = None
    """The figure title's second line, when the reconstruction is not the pixels the model predicts."""
    encoders: tuple[str, ...] = ("vit",)
    """The encoder families (``model_args.encoder``, :data:`maelab.config.ENCODERS`) the method can train."""


def _reconstruction_figure(cfg: ModelConfig, imgs: torch.Tensor, out: Any) -> dict[str, torch.Tensor] | None:
    """:func:`maelab.viz.reconstruct`'s images for pixel targets; for HOG targets (MaskFeat, MAE with
    ``target=hog``) :func:`maelab.viz.hog.hog_images`: the target's and the prediction's HOG energy per patch."""
    if cfg.target != "pixels":
        from maelab.models.targets import TARGETS
        from maelab.viz.hog import hog_images

        target = TARGETS[cfg.target].compute(imgs, cfg.patch_size, cfg.norm_pix_loss)
        return hog_images(imgs, target, out.pred.float().cpu(), out.mask.cpu(), cfg.patch_size)
    from maelab.viz import reconstruct

    return reconstruct(imgs, out.pred.float().cpu(), out.mask.cpu(), cfg.patch_size, cfg.norm_pix_loss)


def _build_mae(cfg: ModelConfig, options: None = None, /) -> nn.Module:
    from maelab.models.mae import MaskedAutoencoder

    return MaskedAutoencoder(cfg)


def _build_simmim(cfg: ModelConfig, options: MaskedEncoderOptions | None = None, /) -> nn.Module:
    if cfg.encoder == "swin":
        from maelab.methods.swin import SwinMaskedEncoder

        return SwinMaskedEncoder(cfg, options or SimMIMOptions())
    from maelab.methods.masked_encoder import MaskedEncoder

    return MaskedEncoder(cfg, options or SimMIMOptions())


def _build_maskfeat(cfg: ModelConfig, options: MaskedEncoderOptions | None = None, /) -> nn.Module:
    from maelab.methods.masked_encoder import MaskedEncoder

    return MaskedEncoder(cfg, options or MaskFeatOptions())


def _build_ae(cfg: ModelConfig, options: None = None, /) -> nn.Module:
    from maelab.methods.autoencoder import Autoencoder

    return Autoencoder(cfg)


def _build_vae(cfg: ModelConfig, options: VAEOptions | None = None, /) -> nn.Module:
    from maelab.methods.autoencoder import Autoencoder

    return Autoencoder(cfg, options or VAEOptions())


def _build_beit(cfg: ModelConfig, options: BEiTOptions | None = None, /) -> nn.Module:
    from maelab.methods.beit import BEiT, checked_tokenizer

    path = (options or BEiTOptions()).tokenizer
    assert path is not None  # BEiTOptions requires it
    return BEiT(cfg, checked_tokenizer(path, cfg))  # the registry reads the file: the model does no I/O


def _beit_figure(cfg: ModelConfig, imgs: torch.Tensor, out: Any) -> dict[str, torch.Tensor] | None:
    from maelab.methods.beit import beit_figure

    return beit_figure(cfg, imgs, out)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mae",
            "MAE (He et al. 2022): encoder on the visible patches, light decoder, MSE on the hidden patches",
            _build_mae,
            _reconstruction_figure,
        ),
        Method(
            "simmim",
            "SimMIM (Xie et al. 2022): encoder (ViT or Swin) on all patches with mask tokens, linear head, L1 on "
            "hidden pixels",
            _build_simmim,
            _reconstruction_figure,
            SimMIMOptions,
            {"mask_ratio": 0.6, "mask_type": "random"},
            encoders=("vit", "swin"),
        ),
        Method(
            "maskfeat",
            "MaskFeat (Wei et al. 2022): encoder on all patches with mask tokens, linear head, MSE on hidden HOG",
            _build_maskfeat,
            _reconstruction_figure,
            MaskFeatOptions,
            {"mask_ratio": 0.4, "mask_type": "block", "target": "hog"},
        ),
        Method(
            "ae",
            "autoencoder baseline: encoder and MAE decoder on every patch, no masking, MSE on every patch",
            _build_ae,
            _reconstruction_figure,
            None,
            {"mask_ratio": 0.0},
        ),
        Method(
            "vae",
            "variational autoencoder baseline: per-token Gaussian latent, MAE decoder, MSE + beta * KL",
            _build_vae,
            _reconstruction_figure,
            VAEOptions,
            {"mask_ratio": 0.0},
        ),
        Method(
            "beit",
            "BEiT (Bao et al. 2022): encoder on all patches with mask tokens, cross-entropy on a frozen VQ "
            "tokenizer's codes of the hidden patches",
            _build_beit,
            _beit_figure,
            BEiTOptions,
            {"mask_ratio": 0.4, "mask_type": "block"},
            "reconstruction: the tokenizer's decoding of the predicted codes",
        ),
    )
}


HOG_FIGURE_NOTE = "HOG per patch: hue = dominant edge orientation, brightness = how dominant"


def figure_note(method: Method, cfg: ModelConfig) -> str | None:
    """The figure title's second line for ``method`` on ``cfg`` (its own note, the HOG legend, or None)."""
    return method.figure_note or (HOG_FIGURE_NOTE if cfg.target == "hog" else None)


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line ConfigError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"invalid method={name!r}: one of {', '.join(sorted(METHODS))}") from None


def method_options(method: Method, raw: Mapping[str, Any] | None) -> Any:
    """The options instance of ``method`` from ``method_args`` (``raw``; missing keys take the method's
    defaults), or None for a method without options. A one-line ConfigError
    (``invalid method_args.<key>=<value>: ...``) for an unknown key or a bad value."""
    raw = dict(raw or {})
    names = [f.name for f in fields(method.options)] if method.options is not None else []
    for key, value in raw.items():
        if key not in names:
            takes = f"{method.name} takes {', '.join(names)}" if names else f"{method.name} takes no options"
            raise ConfigError(f"invalid method_args.{key}={value!r}: {takes}")
    return None if method.options is None else method.options(**raw)


def method_model_config(method: Method, model: str, model_args: Mapping[str, Any] | None = None) -> ModelConfig:
    """The preset ``model``'s config with the method's ``model_defaults`` and then the run's ``model_args``; a
    one-line ConfigError when the method cannot train that encoder family (e.g. MAE on a Swin)."""
    from maelab.models.registry import get_config

    cfg = get_config(model, **{**method.model_defaults, **dict(model_args or {})})
    if cfg.encoder not in method.encoders:
        raise ConfigError(
            f"invalid model={model!r} for method={method.name!r}: a {cfg.encoder} encoder, and {method.name} trains "
            f"{' or '.join(method.encoders)} encoders (Swin: method=simmim)"
        )
    return cfg


__all__ = [
    "METHODS",
    "Builder",
    "MaskingNoise",
    "Method",
    "figure_note",
    "get_method",
    "masked_image_loss",
    "method_model_config",
    "method_options",
    "pretrain_step",
]
