"""A VQ-VAE visual tokenizer (van den Oord et al. 2017) whose code grid is a ViT's patch grid: BEiT's targets; its
training on the one loop (``maelab tokenizer``, BEiT's first stage) and its loading.

``imgs [B, C, H, W] -> conv encoder (down by patch_size) -> z_e [B, D, h, w] -> nearest code of a K x D codebook
-> codes [B, h*w] -> z_q (straight-through: z_e + sg(z_q - z_e)) -> conv decoder -> recon [B, C, H, W]``.

- Encoder: a 4x4 stride-2 convolution per factor 2 of ``patch_size`` (and one k x k stride-k convolution for an
  odd factor k left, e.g. 7 of 14), a 3x3 convolution, residual blocks (ReLU, 3x3, ReLU, 1x1) and a 1x1
  projection to ``code_dim``; the decoder mirrors it with transposed convolutions. So ``h, w`` is the ViT's
  ``grid_size`` and code ``i`` of a row belongs to patch ``i`` of :func:`maelab.models.patches.patchify`'s order.
- Codebook: updated by exponential moving averages (Razavi et al. 2019, Sonnet's ``VectorQuantizerEMA``), not by a
  codebook loss: per step, counts ``N_k <- d N_k + (1 - d) n_k`` and sums ``m_k <- d m_k + (1 - d) sum z_e``
  (``d = ema_decay``), codes ``e_k = m_k / N_k`` with Laplace-smoothed counts. The loss is therefore
  ``MSE(recon, imgs) + beta * MSE(z_e, sg(z_q))`` (the commitment term, ``beta`` 0.25 as the paper).
- Dead codes: a code whose moving count ``N_k`` falls below ``dead_code_threshold`` (assignments per batch,
  averaged over the recent batches by the same EMA) is restarted at a random encoder output of the current batch
  (count reset to the threshold). Under torchrun the counts and sums are summed over the ranks and the restart
  vectors are rank 0's, so every rank keeps the same codebook.

The codebook, counts, sums and the restart counter are buffers: they are in the state dict, so the training
loop's checkpoints resume exactly. Nearest codes are searched in float32 (autocast off). :meth:`VQTokenizer.encode`
never updates the codebook (in any mode): the same weights give the same codes.

Training (:class:`Tokenizing`, :func:`train_tokenizer`): the tokenizer of a :class:`TokenizerConfig`, the data of
:func:`maelab.data.pipeline.build_training_data` (as pre-training) and AdamW on
:class:`~maelab.engine.loop.Loop`: the run directory (``config.yaml``, ``metrics.jsonl`` with the epoch's
``codebook_usage`` (fraction of the codes used in the epoch), ``perplexity`` (exp of the entropy of the epoch's code
histogram) and ``codes_restarted`` (dead codes restarted so far), ``figures/`` with original | reconstruction grids
and the loss curve, ``checkpoints/`` of kind ``tokenizer``) and an exact resume (the codebook and its moving
averages are buffers; the epoch's code histogram is saved with the checkpoint). :func:`load_tokenizer` reads a run
or checkpoint back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from maelab.config import TrainConfig, _check, batch_summary, check_betas, from_dict, to_dict
from maelab.engine.checkpoint import config_mismatch, resolve_checkpoint_path
from maelab.engine.distributed import all_reduce_min, all_reduce_sum, wrap_ddp
from maelab.engine.loop import Loop, Protocol, RunContext, RunResult, start_run
from maelab.engine.optim import build_adamw
from maelab.engine.runtime import autocast
from maelab.engine.step import TrainStep
from maelab.errors import CheckpointError, ConfigError, error_summary

LAPLACE_EPS = 1e-5
"""Laplace smoothing of the EMA counts (Sonnet's ``epsilon``)."""


@dataclass(frozen=True)
class VQConfig:
    """The tokenizer's architecture and codebook settings (what a checkpoint needs to rebuild it)."""

    img_size: int | tuple[int, int] = 32
    """Input size in pixels; an int or (height, width), divisible by patch_size."""
    patch_size: int = 4
    """The encoder's downsampling factor: the ViT's patch size, so one code per patch."""
    in_chans: int = 3
    """Input image channels."""
    codebook_size: int = 512
    """Number of codes K (BEiT's vocabulary: 8192 on ImageNet)."""
    code_dim: int = 64
    """Dimension of a code vector."""
    hidden_dim: int = 128
    """Channels of the encoder's and decoder's convolutions."""
    num_res_blocks: int = 2
    """Residual blocks after the encoder's downsampling and before the decoder's upsampling."""
    beta: float = 0.25
    """Weight of the commitment loss MSE(z_e, sg(z_q))."""
    ema_decay: float = 0.99
    """Decay of the codebook's moving averages (counts and sums)."""
    dead_code_threshold: float = 1.0
    """A code whose moving count of assignments per batch falls below this is restarted at a random encoder output
    of the batch (0: never)."""

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, list):
            object.__setattr__(self, "img_size", tuple(size))
        sizes = self.img_size if isinstance(self.img_size, tuple) else (self.img_size, self.img_size)
        ok = len(sizes) == 2 and all(isinstance(v, int) and v > 0 for v in sizes)
        _check(ok, "img_size", size, "a positive int or [height, width]")
        _check(self.patch_size >= 1, "patch_size", self.patch_size, "a positive int")
        fits = all(v % self.patch_size == 0 for v in sizes)
        _check(fits, "img_size", size, f"must be divisible by patch_size={self.patch_size}")
        _check(self.in_chans >= 1, "in_chans", self.in_chans, "a positive int")
        _check(self.codebook_size >= 2, "codebook_size", self.codebook_size, "at least 2")
        for name in ("code_dim", "hidden_dim"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "a positive int")
        _check(self.num_res_blocks >= 0, "num_res_blocks", self.num_res_blocks, "0 or more")
        _check(self.beta >= 0, "beta", self.beta, "0 or more")
        _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in [0, 1)")
        _check(self.dead_code_threshold >= 0, "dead_code_threshold", self.dead_code_threshold, "0 (off) or more")

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the input."""
        s = self.img_size
        return s if isinstance(s, tuple) else (s, s)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The code grid (rows, cols): the ViT's patch grid."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig(TrainConfig):
    """Everything a ``maelab tokenizer`` run needs (the training loop's fields, the data, the codebook). Written to
    ``config.yaml`` in the run directory."""

    model: str = "mae_vit_tiny_patch4_32"
    """ViT preset the tokenizer is for: its image size, patch size and channels (with model_args) set the
    tokenizer's input and its code grid (one code per patch)."""
    output: str = "runs/tokenizer"
    epochs: int = 20
    """Passes over the training set."""
    lr: float | None = 2e-4
    """Absolute peak lr (VQ-VAE: 2e-4 with Adam); null: base_lr * effective_batch / 256."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) of the convolutions (not the biases)."""
    warmup_epochs: float = 0.0
    """Linear lr warmup from 0, in epochs (may be fractional); a longer one than the run becomes the run."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    codebook_size: int = 512
    """Number of codes K: BEiT's vocabulary (8192 for ImageNet; 512 suits CIFAR)."""
    code_dim: int = 64
    """Dimension of a code vector."""
    hidden_dim: int = 128
    """Channels of the encoder's and decoder's convolutions."""
    num_res_blocks: int = 2
    """Residual blocks in the encoder and in the decoder."""
    beta: float = 0.25
    """Weight of the commitment loss: loss = reconstruction MSE + beta * MSE(z_e, sg(z_q))."""
    ema_decay: float = 0.99
    """Decay of the codebook's moving averages (the codebook is learned by EMA updates, not by a loss)."""
    dead_code_threshold: float = 1.0
    """Restart a code whose moving count of assignments per batch falls below this at a random encoder output of
    the current batch (0: never restart)."""
    vis_every: int = 5
    """Epochs between reconstruction figures (one is always written at the end)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-identical reruns and resumes on GPU too (slower)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        super().__post_init__()
        check_betas(self.betas)
        _check(self.vis_every >= 1, "vis_every", self.vis_every, "a positive int")
        self.vq_config()  # checks the preset, model_args and the codebook fields

    def vq_config(self) -> VQConfig:
        """The tokenizer's :class:`VQConfig`: image size, patch size and channels from ``model`` + ``model_args``."""
        from maelab.models.registry import get_config

        vit = get_config(self.model, **self.model_args)
        return VQConfig(
            img_size=vit.img_size,
            patch_size=vit.patch_size,
            in_chans=vit.in_chans,
            codebook_size=self.codebook_size,
            code_dim=self.code_dim,
            hidden_dim=self.hidden_dim,
            num_res_blocks=self.num_res_blocks,
            beta=self.beta,
            ema_decay=self.ema_decay,
            dead_code_threshold=self.dead_code_threshold,
        )


class TokenizerOutput(NamedTuple):
    """loss: scalar (recon_loss + beta * commitment); recon: [B, C, H, W]; codes: [B, L] long; perplexity:
    scalar exp(entropy) of the batch's code histogram; usage: scalar fraction of the codes used in the batch;
    recon_loss, commitment: scalars."""

    loss: torch.Tensor
    recon: torch.Tensor
    codes: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    recon_loss: torch.Tensor
    commitment: torch.Tensor


def _down_steps(patch_size: int) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of the encoder's downsampling convolutions for ``patch_size``: 4x4 stride 2 per
    factor 2, then one k x k stride k for the odd factor k left (none when it is 1)."""
    steps, rest = [], patch_size
    while rest % 2 == 0:
        steps.append((4, 2, 1))
        rest //= 2
    if rest > 1:
        steps.append((rest, rest, 0))
    return steps


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))) (the VQ-VAE paper's residual block)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(dim, dim // 2 or 1, 3, padding=1), nn.ReLU(), nn.Conv2d(dim // 2 or 1, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residual_stack(dim: int, blocks: int) -> list[nn.Module]:
    return [*(ResidualBlock(dim) for _ in range(blocks)), nn.ReLU()]


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantization with EMA codebook updates and dead-code restarts (module docstring)."""

    embedding: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    restarts: torch.Tensor

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.code_dim
        embedding = torch.empty(k, d).uniform_(-1 / k, 1 / k)
        self.register_buffer("embedding", embedding)  # [K, D]
        # as if each code had been assigned once to itself: an unused code keeps its vector until restarted
        self.register_buffer("cluster_size", torch.ones(k))  # [K] moving count of assignments per batch
        self.register_buffer("embed_sum", embedding.clone())  # [K, D] moving sum of the assigned vectors
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # dead codes restarted so far

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> the index of the nearest code of each row [N] (squared Euclidean distance, float32)."""
        z = z.float()
        e = self.embedding.float()
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA update of the codebook from this batch's encoder outputs z [N, D] and their codes [N], then the
        dead-code restarts (summed over the ranks under torchrun; restart vectors from rank 0)."""
        cfg = self.cfg
        z = z.float()
        counts = torch.bincount(codes, minlength=cfg.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        d = cfg.ema_decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + LAPLACE_EPS) / (n + cfg.codebook_size * LAPLACE_EPS) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < cfg.dead_code_threshold
        num_dead = int(dead.sum())  # a host sync per step: the tokenizer is small
        if num_dead == 0:
            return
        picked = z[torch.randint(0, z.shape[0], (num_dead,), device=z.device)]
        if distributed:
            torch.distributed.broadcast(picked, src=0)
        self.embedding[dead] = picked
        self.embed_sum[dead] = picked * cfg.dead_code_threshold
        self.cluster_size[dead] = cfg.dead_code_threshold
        self.restarts += num_dead

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e [B, D, h, w] -> (z_q [B, D, h, w] with the straight-through gradient to z_e, codes [B, h*w] long,
        commitment loss scalar). In training mode the codebook is updated after the search."""
        b, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D], row-major over the grid
            codes = self.nearest(flat.detach())
            z_q = self.embedding[codes]  # [B*h*w, D], the codebook before this step's update
            commitment = F.mse_loss(flat, z_q)
            if self.training:
                self.update(flat.detach(), codes)
            z_q = flat + (z_q - flat).detach()  # straight-through estimator
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)
        return z_q, codes.view(b, h * w), commitment


class VQTokenizer(nn.Module):
    """Conv encoder -> :class:`VectorQuantizerEMA` -> conv decoder; codes on the ViT's patch grid."""

    quantizer: VectorQuantizerEMA

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, hid = cfg.in_chans, cfg.hidden_dim
        steps = _down_steps(cfg.patch_size)
        down: list[nn.Module] = []
        for i, (k, s, p) in enumerate(steps):
            down += [nn.Conv2d(c if i == 0 else hid, hid, k, s, p), nn.ReLU()]
        self.encoder = nn.Sequential(
            *down,
            nn.Conv2d(hid if steps else c, hid, 3, padding=1),
            *_residual_stack(hid, cfg.num_res_blocks),
            nn.Conv2d(hid, cfg.code_dim, 1),
        )
        self.quantizer = VectorQuantizerEMA(cfg)
        up: list[nn.Module] = []
        for i, (k, s, p) in enumerate(reversed(steps)):
            last = i == len(steps) - 1
            up.append(nn.ConvTranspose2d(hid, c if last else hid, k, s, p))
            if not last:
                up.append(nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, hid, 3, padding=1),
            *_residual_stack(hid, cfg.num_res_blocks),
            *(up or [nn.Conv2d(hid, c, 3, padding=1)]),
        )

    def _check(self, imgs: torch.Tensor) -> None:
        h, w = self.cfg.image_hw
        if imgs.dim() != 4 or imgs.shape[1] != self.cfg.in_chans or tuple(imgs.shape[-2:]) != (h, w):
            raise ValueError(f"expected images [B, {self.cfg.in_chans}, {h}, {w}], got {tuple(imgs.shape)}")

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> codes [B, L] long (row-major over the patch grid). Never updates the codebook."""
        self._check(imgs)
        z_e = self.encoder(imgs)
        b, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):
            codes = self.quantizer.nearest(z_e.float().permute(0, 2, 3, 1).reshape(-1, d))
        return codes.view(b, h * w)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] long -> images [B, C, H, W] (the decoder on the codes' vectors)."""
        gh, gw = self.cfg.grid_size
        z_q = self.quantizer.embedding[codes].view(codes.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
        return self.decoder(z_q)

    def forward(self, imgs: torch.Tensor) -> TokenizerOutput:
        """imgs [B, C, H, W] -> :class:`TokenizerOutput`; in training mode the codebook's EMA update runs."""
        self._check(imgs)
        z_q, codes, commitment = self.quantizer(self.encoder(imgs))
        recon = self.decoder(z_q)
        recon_loss = F.mse_loss(recon.float(), imgs.float())
        with torch.no_grad():
            counts = torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        return TokenizerOutput(
            recon_loss + self.cfg.beta * commitment, recon, codes, perplexity, usage, recon_loss, commitment
        )


def tokenizer_state(model: VQTokenizer) -> dict[str, Any]:
    """What :func:`load_tokenizer` reads from a checkpoint besides the training loop's fields: ``kind``,
    ``tokenizer_config`` (the :class:`VQConfig` as a dict) and ``model`` (the state dict)."""
    return {"kind": "tokenizer", "tokenizer_config": to_dict(model.cfg), "model": model.state_dict()}


def load_tokenizer(path: str | Path) -> VQTokenizer:
    """The trained tokenizer of a ``maelab tokenizer`` run directory (its last good checkpoint) or checkpoint file,
    in eval mode with gradients off.

    Raises:
        CheckpointError: no such path, not a tokenizer checkpoint, or weights that do not fit its configuration.
    """
    from maelab.models.weights import read_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"tokenizer not found: {p} (give a `maelab tokenizer` run directory or its .pt file)")
    p = resolve_checkpoint_path(p)
    raw = read_checkpoint(p)
    kind = raw.get("kind", "pretrain") if isinstance(raw, dict) else "foreign"
    if kind != "tokenizer" or "tokenizer_config" not in raw:
        raise CheckpointError(f"{p}: a {kind} checkpoint, not a tokenizer; train one with `maelab tokenizer`")
    try:
        model = VQTokenizer(from_dict(VQConfig, raw["tokenizer_config"], prefix="tokenizer_config."))
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from e
    try:
        model.load_state_dict(raw["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: weights do not match its tokenizer_config ({error_summary(e)})") from e
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- training: the protocol
NUM_VIS_SAMPLES = 8


def save_tokenizer_grid(
    original: torch.Tensor,
    recon: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
) -> Path:
    """A PNG with one row per image: original | tokenizer reconstruction (both [N, C, H, W], normalized with
    ``mean``/``std``), written atomically."""
    from matplotlib.figure import Figure

    from maelab.viz.reconstruction import _atomic_savefig, _to_display

    cols = [_to_display(original, mean, std), _to_display(recon, mean, std)]
    rows = original.shape[0]
    h, w = original.shape[-2:]
    fig = Figure(figsize=(4.0, 2.0 * rows * h / w + 0.6), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    for r in range(rows):
        for j, name in enumerate(("original", "reconstruction")):
            ax = axes[r][j]
            gray = cols[j].ndim == 3
            ax.imshow(cols[j][r], interpolation="nearest", **(dict(cmap="gray", vmin=0.0, vmax=1.0) if gray else {}))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return _atomic_savefig(fig, path)


class Tokenizing(Protocol):
    """VQ-VAE tokenizer training on the loop: model, data, AdamW, the code histogram of each epoch, figures."""

    kind = "tokenizer"
    model: VQTokenizer

    def __init__(self, ctx: RunContext) -> None:
        from maelab.eval.common import resolve_stats

        self.ctx = ctx
        self.cfg = cfg = ctx.cfg
        self.dist, self.device, self.dtype = ctx.dist, ctx.device, ctx.dtype
        self.vq_cfg = cfg.vq_config()
        self.mean, self.std = resolve_stats(cfg.data, self.vq_cfg.in_chans)
        self.model = VQTokenizer(self.vq_cfg).to(self.device)
        forward, no_sync = wrap_ddp(self.model, self.dist, self.device)
        self.data = ctx.training_data(self.vq_cfg.img_size, self.vq_cfg.in_chans, self.mean, self.std)
        self.batches_per_epoch = self.data.batches_per_epoch
        self.optimizer = build_adamw(self.model, cfg.resolved_lr(self.dist.world_size), cfg.weight_decay, cfg.betas)
        # this rank's histogram of the codes assigned in the current epoch's training batches
        self.code_counts = torch.zeros(self.vq_cfg.codebook_size, dtype=torch.long, device=self.device)
        self.step_fn = TrainStep(
            forward,
            self.loss,
            self.optimizer,
            self.device,
            self.dtype,
            parameters=self.model.parameters(),
            scaler=torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16),
            grad_clip=cfg.grad_clip,
            no_sync=no_sync,
            skip_nonfinite=cfg.max_bad_steps > 0,
            all_reduce_min=lambda t: all_reduce_min(t, self.dist),
        )
        self.vis_batch = (
            self.data.fixed_images(NUM_VIS_SAMPLES, self.vq_cfg.img_size, self.mean, self.std, cfg.data.crop_pct)
            if ctx.is_main
            else None
        )

    def summary(self) -> str:
        cfg, vq = self.cfg, self.vq_cfg
        world = self.dist.world_size
        params = sum(p.numel() for p in self.model.parameters())
        steps = self.batches_per_epoch // cfg.accum_steps * cfg.epochs
        gh, gw = vq.grid_size
        return (
            f"training a VQ tokenizer for {cfg.model} ({vq.codebook_size} codes x {vq.code_dim} dims on a {gh}x{gw} "
            f"grid, {params / 1e6:.2f}M params) on {cfg.data.name!r} ({len(self.data.dataset)} images, "
            f"{self.data.description}); {batch_summary(cfg.batch_size, cfg.accum_steps, world, cfg.resolved_lr(world))}"
            f", {cfg.epochs} epochs = {steps} steps, {self.device} {str(self.dtype).removeprefix('torch.')}; "
            f"output {self.ctx.out}"
        )

    # ------------------------------------------------------------------ loop hooks
    def loss(self, forward: Callable[..., Any], imgs: torch.Tensor) -> torch.Tensor:
        """The tokenizer's loss on a micro-batch; its codes are added to the epoch's histogram."""
        out = forward(imgs.to(self.device, non_blocking=True))
        self.code_counts += torch.bincount(out.codes.flatten(), minlength=self.vq_cfg.codebook_size)
        return out.loss

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Any]:
        self.data.sampler.set_epoch(epoch, start=start_batch * self.cfg.batch_size)
        return (imgs for imgs, _ in self.data.loader)

    def images_in(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0]) * self.dist.world_size

    def start_epoch(self, epoch: int) -> None:
        self.code_counts.zero_()

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        """codebook_usage, perplexity of the epoch's code histogram (all ranks), codes_restarted so far."""
        counts = all_reduce_sum(self.code_counts, self.dist).double()
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
        return {
            "codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp()),
            "codes_restarted": int(self.model.quantizer.restarts),
        }

    def epoch_message(self, record: dict[str, Any]) -> str | None:
        return (
            f"epoch {record['epoch']}: codebook usage {record['codebook_usage']:.1%}, "
            f"perplexity {record['perplexity']:.1f} of {self.vq_cfg.codebook_size}"
        )

    def end_of_epoch(self, epoch: int, final: bool) -> None:
        if not self.ctx.is_main:
            return
        if final or epoch % self.cfg.vis_every == 0:
            self.write_figure(epoch)
        self.write_loss_curve()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {"tokenizer_config": to_dict(self.vq_cfg), "code_counts": self.code_counts.cpu()}

    def load_extra_state(self, state: dict[str, Any], start_batch: int) -> None:
        diff = config_mismatch(state.get("tokenizer_config", {}), to_dict(self.vq_cfg))
        if diff:
            raise CheckpointError(
                f"{self.ctx.state_path}: checkpoint was trained with a different tokenizer ({'; '.join(diff)})"
            )
        self.code_counts.copy_(state["code_counts"])

    # ------------------------------------------------------------------ outputs
    def write_loss_curve(self) -> None:
        from maelab.engine.metrics import STEP_LOG, read_records
        from maelab.viz import save_loss_curve

        out = self.ctx.out
        save_loss_curve(
            read_records(out / "metrics.jsonl") + read_records(out / STEP_LOG), out / "figures" / "loss_curve.png"
        )

    @torch.no_grad()
    def write_figure(self, epoch: int) -> Path:
        """``figures/reconstruction_epochNNNN.png``: the fixed images | the decoding of their codes."""
        assert self.vis_batch is not None
        imgs = self.vis_batch.to(self.device)
        with autocast(self.device, self.dtype):
            recon = self.model.decode_codes(self.model.encode(imgs))
        vq = self.vq_cfg
        title = f"VQ tokenizer ({vq.codebook_size} codes, {vq.grid_size[0]}x{vq.grid_size[1]} grid), epoch {epoch}"
        path = self.ctx.out / "figures" / f"reconstruction_epoch{epoch:04d}.png"
        return save_tokenizer_grid(imgs.cpu(), recon.float().cpu(), path, self.mean, self.std, title)


def train_tokenizer(
    cfg: TokenizerConfig, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> RunResult:
    """Train the tokenizer described by ``cfg`` on the one loop (``max_steps``: stop with a checkpoint after that
    many optimizer steps); see :class:`Tokenizing`."""
    ctx = start_run(cfg, Tokenizing.kind, resume=resume, progress=progress)
    return Loop(Tokenizing(ctx)).run(max_steps=max_steps)


__all__ = [
    "TokenizerConfig",
    "TokenizerOutput",
    "Tokenizing",
    "VQConfig",
    "VQTokenizer",
    "VectorQuantizerEMA",
    "load_tokenizer",
    "save_tokenizer_grid",
    "tokenizer_state",
    "train_tokenizer",
]
