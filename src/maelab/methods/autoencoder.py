"""Autoencoder baselines without masking: a plain autoencoder (AE) and a variational one (VAE).

``patch embed + position embedding, cls first -> ViT encoder on every patch -> [VAE: per-token Gaussian latent,
sampled] -> MAE's decoder (width, depth and heads from the config, fixed sin-cos position embedding) ->
prediction for every patch -> MSE on every patch``.

The target is the model's (pixels, per-patch normalized with ``norm_pix_loss``, or HOG). The VAE's encoder
output gives, per token (cls included), a mean and a log-variance (two Linear heads of the encoder's width);
in training the decoder gets ``mu + exp(logvar / 2) * eps`` with ``eps`` from torch's global random generator
(the reparameterization trick), in evaluation ``mu``. Its loss is ``reconstruction + beta * KL``, the KL to
N(0, I) summed over a token's latent dimensions and averaged over the tokens (1 + L) and the images:

``KL = mean_tokens( -0.5 * sum_dims(1 + logvar - mu^2 - exp(logvar)) )``.

The log-variance is clamped to [-30, 20] (as diffusers' ``DiagonalGaussianDistribution``) so ``exp`` stays
finite. ``draw_noise`` gives all-zero noise and ``mask`` is all False: nothing is hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from maelab.config import ModelConfig
from maelab.methods.options import VAEOptions
from maelab.methods.vit import (
    build_encoder,
    check_images,
    embed_tokens,
    init_linear_and_norm,
    regression_target,
    run_blocks,
    target_dim,
)
from maelab.models.mae import decoder_blocks
from maelab.models.pos_embed import sincos_2d

LOGVAR_RANGE = (-30.0, 20.0)
"""The VAE's log-variance is clamped to this range before use."""


class AutoencoderOutput(NamedTuple):
    """loss: scalar (``recon_loss + beta * kl``); pred: [B, L, D] reconstruction in target space; mask: [B, L]
    bool, all False; recon_loss: scalar MSE over every patch; kl: scalar mean KL per token (0 for the AE)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    recon_loss: torch.Tensor
    kl: torch.Tensor


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dimension: [..., D] -> [...] (float32)."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


class Autoencoder(nn.Module):
    """AE (``vae=None``) or VAE: a timm ViT encoder (``self.encoder``) on every patch and MAE's decoder."""

    def __init__(self, cfg: ModelConfig, vae: VAEOptions | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = vae
        e, d = cfg.embed_dim, cfg.decoder_embed_dim
        self.encoder = build_encoder(cfg)
        if vae is not None:
            self.latent_mean = nn.Linear(e, e)
            self.latent_logvar = nn.Linear(e, e)
        self.decoder_embed = nn.Linear(e, d)
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(d, cfg.grid_size, cls_token=True)[None], requires_grad=False
        )  # [1, 1 + L, d], fixed
        self.decoder_blocks = decoder_blocks(cfg)  # MAE's decoder blocks
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, target_dim(cfg))
        for name, module in self.named_children():
            if name != "encoder":  # built and initialized by build_encoder
                module.apply(init_linear_and_norm)

    # ------------------------------------------------------------------ stages
    def forward_encoder(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> latent [B, 1 + L, D] (cls first, normed)."""
        enc = self.encoder
        x = run_blocks(enc.blocks, embed_tokens(enc, imgs), self._checkpointing)
        return enc.norm(x)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 1 + L, D] -> pred [B, L, D_target] for every patch."""
        x = self.decoder_embed(z) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self._checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target [B, L, D] -> the reconstruction loss: MSE over every patch (float32 scalar)."""
        return (pred.float() - target.float()).pow(2).mean()

    @property
    def _checkpointing(self) -> bool:
        return self.cfg.grad_checkpointing and self.training

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> AutoencoderOutput:
        """imgs [B, C, H, W]; ``noise`` (all zeros, from :meth:`draw_noise`) is accepted and unused."""
        check_images(self.cfg, imgs)
        latent = self.forward_encoder(imgs)
        if self.vae is None:
            z, kl = latent, latent.new_zeros((), dtype=torch.float32)
        else:
            mu = self.latent_mean(latent)
            logvar = self.latent_logvar(latent).clamp(*LOGVAR_RANGE)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
            kl = gaussian_kl(mu, logvar).mean()
        pred = self.forward_decoder(z)
        recon = self.forward_loss(pred, regression_target(self.cfg, imgs))
        loss = recon if self.vae is None else recon + self.vae.beta * kl
        mask = torch.zeros(pred.shape[:2], dtype=torch.bool, device=pred.device)
        return AutoencoderOutput(loss, pred, mask, recon, kl)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder output for the full image: [B, 1 + L, D] (timm's forward_features)."""
        check_images(self.cfg, imgs)
        return self.encoder.forward_features(imgs)

    # ------------------------------------------------------------------ training plumbing
    def draw_noise(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        rows: range | None = None,
    ) -> torch.Tensor:
        """All-zero noise [batch_size, L] (or [len(rows), L]): nothing is masked; ``generator`` is not used."""
        n = batch_size if rows is None else len(rows)
        return torch.zeros(n, self.cfg.num_patches, device=device)

    @property
    def noise_on_cpu(self) -> bool:
        return False

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: the encoder's, then the decoder's."""
        return [*self.encoder.blocks, *self.decoder_blocks]

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters``) of tokens and position embeddings."""
        return {"encoder.cls_token", "encoder.pos_embed", "decoder_pos_embed"}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's own key names (no latent heads, no decoder)."""
        return dict(self.encoder.state_dict())
