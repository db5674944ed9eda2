"""BEiT: cross-entropy on a frozen tokenizer's codes at the hidden patches only, BEiT's block masking, the tokenizer
kept out of the weights and the optimizer, its checks, the figure, and pre-training on the loop with an exact
resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.methods.test_tokenizer import TINY_VQ, tiny_tokenizer_cfg, write_tokenizer
from tests.methods.tiny import TINY, build, smooth_images

from maelab.config import PretrainConfig, build_config
from maelab.engine.checkpoint import LAST, load_pretrained
from maelab.engine.optim import build_adamw
from maelab.engine.pretrain import pretrain
from maelab.errors import ConfigError
from maelab.methods import get_method, method_options
from maelab.methods.beit import BEiT
from maelab.methods.tokenizer import train_tokenizer
from maelab.models.masking import block_mask
from maelab.models.patches import patchify

HIDDEN = 64 - int(64 * 0.6)  # 40% of the 8 x 8 patches: 26


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny tokenizer for 32 px images in 4 px patches, as a checkpoint file."""
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.pt")


def beit(tokenizer: Path, **model_args: object) -> BEiT:
    model = build("beit", {"tokenizer": str(tokenizer)}, **model_args)
    assert isinstance(model, BEiT)
    return model


def test_defaults_are_beits(tokenizer_file: Path) -> None:
    model = beit(tokenizer_file)
    assert (model.cfg.mask_type, model.cfg.mask_ratio, model.num_masked) == ("block", 0.4, HIDDEN)
    assert model.head.out_features == TINY_VQ["codebook_size"]
    assert model.tokenizer.cfg.codebook_size == TINY_VQ["codebook_size"]  # the file the options name
    out = model(smooth_images(), noise=model.draw_noise(4, "cpu", torch.Generator().manual_seed(0)))
    assert out.loss.dim() == 0 and math.isfinite(out.loss.item())
    assert out.pred.shape == out.target.shape == out.mask.shape == (4, 64) and out.pixels is None


def test_the_tokenizer_is_frozen_outside_the_weights_and_the_optimizer(tokenizer_file: Path) -> None:
    model = beit(tokenizer_file)
    tokenizer_params = {id(p) for p in model.tokenizer.parameters()}
    assert tokenizer_params and not tokenizer_params & {id(p) for p in model.parameters()}
    optimizer = build_adamw(model, 1e-3)
    assert not tokenizer_params & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(k.startswith("tokenizer") for k in model.state_dict())
    assert model.state_dict().keys() == build("simmim").state_dict().keys()  # the masked encoder's weights only
    model.train()
    assert model.training and not model.tokenizer.training
    model(smooth_images(), noise=model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))).loss.backward()
    assert all(p.grad is None for p in model.tokenizer.parameters())
    model.to(torch.float64)  # conversions reach the tokenizer (and so would .to(device))
    assert model.tokenizer.quantizer.embedding.dtype == model.tokenizer.encoder[0].weight.dtype == torch.float64


def test_cross_entropy_counts_the_hidden_patches_only(tokenizer_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = beit(tokenizer_file).eval()
    imgs = smooth_images()
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(1))
    codes = torch.randint(0, TINY_VQ["codebook_size"], (4, 64), generator=torch.Generator().manual_seed(2))

    def loss_with(targets: torch.Tensor) -> torch.Tensor:
        monkeypatch.setattr(model.tokenizer, "encode", lambda _imgs: targets)
        with torch.no_grad():
            return model(imgs, noise=noise).loss

    base = loss_with(codes)
    mask = model.mask_from_noise(noise)
    with torch.no_grad():  # the definition: mean cross-entropy of the head's logits at the hidden patches
        logits = model.head(model.forward_encoder(imgs, mask)[:, 1:])
    torch.testing.assert_close(base, F.cross_entropy(logits[mask], codes[mask]))
    visible, hidden = (~mask[0]).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    for position, changes in ((visible, False), (hidden, True)):
        changed = codes.clone()
        changed[0, position] = (codes[0, position] + 1) % TINY_VQ["codebook_size"]
        assert bool(loss_with(changed) != base) is changes, position


class SpyRandom(random.Random):
    """Records block_mask's draws: per placement try, (area, log aspect) from uniform, then (top, left) from randint
    with the bounds that give the rectangle's height and width."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.uniforms: list[float] = []
        self.rects: list[tuple[float, float, int, int, int, int]] = []  # area, aspect, top, left, h, w
        self._pending: list[tuple[int, int]] = []

    def uniform(self, a: float, b: float) -> float:
        value = super().uniform(a, b)
        self.uniforms.append(value)
        return value

    def randint(self, a: int, b: int) -> int:
        value = super().randint(a, b)
        self._pending.append((value, b))
        if len(self._pending) == 2:
            (top, rows_left), (left, cols_left) = self._pending
            area, log_aspect = self.uniforms[-2:]
            self.rects.append((area, math.exp(log_aspect), top, left, 14 - rows_left, 14 - cols_left))
            self._pending = []
        return value


def test_block_masks_are_beits_rectangles_at_about_40_percent(tokenizer_file: Path) -> None:
    num_masked = 196 - int(196 * 0.6)  # 14 x 14 patches at mask_ratio 0.4: 79 (BEiT: 75)
    for seed in range(20):
        rng = SpyRandom(seed)
        mask = block_mask((14, 14), num_masked, rng)
        assert 0.75 * num_masked <= int(mask.sum()) <= num_masked
        covered = torch.zeros(14, 14, dtype=torch.bool)
        for area, aspect, top, left, h, w in rng.rects:
            # BEiT's MaskingGenerator: area >= 16 patches, aspect ratio in [0.3, 1/0.3], sides rounded
            assert area >= 16 and 0.3 - 1e-9 <= aspect <= 1 / 0.3 + 1e-9
            assert (h, w) == (round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect)))
            covered[top : top + h, left : left + w] = True
        assert not (mask & ~covered).any()  # every hidden patch lies in such a rectangle
    model = beit(tokenizer_file)  # the model: those blocks first, topped up at random to exactly 40%
    noise = model.draw_noise(16, "cpu", torch.Generator().manual_seed(0))
    mask = model.mask_from_noise(noise)
    assert (mask.sum(dim=1) == HIDDEN).all()
    assert not ((noise >= 1) & ~mask).any()  # block patches (noise in [1, 2)) are all hidden
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_a_missing_or_mismatched_tokenizer_is_a_one_line_config_error(tokenizer_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        beit(missing)
    message = str(err.value)
    assert message.startswith(f"invalid method_args.tokenizer='{missing}': no such run directory or file")
    assert "maelab tokenizer" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"invalid method_args.tokenizer=None: .*\(required\)"):
        method_options(get_method("beit"), {})
    coarse = write_tokenizer(tmp_path / "patch8.pt", patch_size=8)
    with pytest.raises(ConfigError) as err:
        beit(coarse)
    message = str(err.value)
    assert str(coarse) in message and "\n" not in message
    assert "it tokenizes 32x32 px, 4x4 codes, 3 channels; the model needs 32x32 px, 8x8 codes, 3 channels" in message
    with pytest.raises(ConfigError, match="the model needs 32x32 px, 8x8 codes, 1 channels"):
        beit(tokenizer_file, in_chans=1)


def test_the_figure_decodes_the_predicted_codes(tokenizer_file: Path) -> None:
    model = beit(tokenizer_file).eval()
    imgs = smooth_images(2)
    with torch.no_grad():
        out = model(imgs, noise=model.draw_noise(2, "cpu", torch.Generator().manual_seed(0)))
    assert torch.equal(out.pred[~out.mask], out.target[~out.mask])  # visible patches: the tokenizer's own codes
    assert out.pixels is not None
    torch.testing.assert_close(out.pixels, model.tokenizer.decode_codes(out.pred))
    images = get_method("beit").figure(model.cfg, imgs, out)
    assert images is not None and set(images) == {"original", "masked", "reconstruction", "pasted", "mask"}
    torch.testing.assert_close(images["reconstruction"], out.pixels)
    torch.testing.assert_close(images["mask"][:, 0, ::4, ::4], out.mask.view(2, 8, 8).float())
    pasted, original = patchify(images["pasted"], 4), patchify(imgs, 4)
    torch.testing.assert_close(pasted[~out.mask], original[~out.mask])


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained tokenizer run (one step)."""
    run = tmp_path_factory.mktemp("tokrun") / "tokenizer"
    train_tokenizer(tiny_tokenizer_cfg(run, epochs=1, **{"data.num_samples": 16}), progress=False)
    return run


def beit_cfg(output: Path, tokenizer: Path) -> PretrainConfig:
    overrides = {
        "model": "mae_vit_tiny_patch4_32",
        "method": "beit",
        "method_args.tokenizer": str(tokenizer),
        "output": str(output),
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_epochs": 0,
        "log_every": 1,
        "vis_every": 2,
        "data.num_samples": 32,
        "data.num_workers": 0,
        "device": "cpu",
        **{f"model_args.{k}": v for k, v in TINY.items()},
    }
    return build_config(PretrainConfig, None, overrides)


@pytest.fixture(scope="module")
def full_run(tokenizer_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted 2-epoch BEiT pre-training (run directory, final loss)."""
    run = tmp_path_factory.mktemp("beit") / "full"
    return run, pretrain(beit_cfg(run, tokenizer_run), progress=False).final_loss


def test_pretraining_learns_writes_the_figure_and_loads_back(full_run: tuple[Path, float], tokenizer_run: Path) -> None:
    run, _ = full_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.95 * records[0]["loss"], [r["loss"] for r in records]  # frozen: 0.996
    assert (run / "figures" / "reconstruction_epoch0002.png").is_file()
    state = torch.load(run / "checkpoints" / LAST, weights_only=False)
    assert state["method"] == "beit" and state["method_args"] == {"tokenizer": str(tokenizer_run.absolute())}
    assert not any(k.startswith("tokenizer") for k in state["model"])
    model = load_pretrained(run, need_decoder=True)  # the whole model: its tokenizer is loaded too
    assert isinstance(model, BEiT)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    encoder = load_pretrained(run)  # evaluation and export: the encoder alone, without the tokenizer
    assert not isinstance(encoder, BEiT) and encoder.cfg == model.cfg
    for key, value in encoder.encoder.state_dict().items():
        assert torch.equal(value, state["model"][f"encoder.{key}"]), key


def test_pretraining_resumes_bit_exactly(full_run: tuple[Path, float], tokenizer_run: Path, tmp_path: Path) -> None:
    full, full_loss = full_run
    part = beit_cfg(tmp_path / "part", tokenizer_run)
    assert pretrain(part, progress=False, max_steps=3).stopped_early  # mid-epoch 2 (2 steps per epoch)
    resumed = pretrain(part, progress=False, resume=True)
    a = torch.load(full / "checkpoints" / LAST, weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / LAST, weights_only=False)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert resumed.final_loss == full_loss
