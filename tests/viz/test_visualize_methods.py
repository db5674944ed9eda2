"""``maelab visualize`` on runs of methods other than MAE: the model draws its own masking noise (SimMIM's whole mask
units, at the run's ratio) and the figure is the method's (pixels for SimMIM on a ViT or a Swin, the HOG grid for
MaskFeat); another ``--mask-ratio`` than the run's is a one-line error. MAE's: tests/cli/test_cli.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tests.conftest import error_line

import maelab.viz.hog as hog
from maelab.cli import main
from maelab.config import PretrainConfig, build_config
from maelab.engine.checkpoint import load_pretrained_with_config
from maelab.engine.pretrain import pretrain
from maelab.methods import HOG_FIGURE_NOTE

VIT = "mae_vit_pico_patch4_32"
SWIN = "swin_pico_patch2_window4_32"
RUNS = {
    "simmim-vit": ("simmim", VIT, 0.6),
    "simmim-swin": ("simmim", SWIN, 0.6),
    "maskfeat-vit": ("maskfeat", VIT, 0.4),
}
"""(method, model, the method's default mask ratio) of each run."""
IMAGES = 3
SEED = 3


class LazyRuns(dict):
    """name -> run directory, pre-trained (one optimizer step through the real loop) on first use, so the default
    suite trains only the runs its tests use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        method, model, _ = RUNS[name]
        overrides = {
            "model": model,
            "method": method,
            "output": str(self.root / name),
            "epochs": 1,
            "batch_size": 8,
            "warmup_epochs": 0,
            "data.num_samples": 8,
            "data.num_workers": 0,
            "device": "cpu",
            "vis_every": 1000,
        }
        assert pretrain(build_config(PretrainConfig, None, overrides), progress=False, max_steps=1).step == 1
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The runs of :data:`RUNS`, trained when a test first asks for one."""
    return LazyRuns(tmp_path_factory.mktemp("visualize"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images of other sizes than the models' 32 px (visualize resizes them)."""
    folder = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(40, 30), (32, 32), (64, 48)]):
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(folder / f"{i}.png")
    return folder


def expected_pixel_mask(run: Path) -> torch.Tensor:
    """[B, 1, H, W] hidden pixels of the mask the run's model draws for IMAGES images with SEED."""
    model, _ = load_pretrained_with_config(run, need_decoder=True)
    noise = model.draw_noise(IMAGES, "cpu", generator=torch.Generator().manual_seed(SEED))
    mask = model.mask_from_noise(noise)
    (gh, gw), p = model.cfg.grid_size, model.cfg.patch_size
    grid = mask.view(IMAGES, 1, gh, gw).float()
    return grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


# the default suite draws the Swin run (a non-MAE model, its own masks, pixels); -m slow adds SimMIM on a ViT and
# MaskFeat's HOG grid (the HOG figure itself: tests/viz, the pre-training figures of every method: tests/methods)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("simmim-vit", marks=pytest.mark.slow),
        "simmim-swin",
        pytest.param("maskfeat-vit", marks=pytest.mark.slow),
    ],
)
def test_visualize_draws_the_methods_figure_with_its_own_masks(
    runs: dict[str, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    drawn: list[tuple[dict[str, torch.Tensor], str | None]] = []
    real = hog.save_figure

    def spy(figure: Mapping[str, torch.Tensor], path: Any, mean: Any, std: Any, title: str | None = None) -> Path:
        drawn.append((dict(figure), title))
        return real(figure, path, mean, std, title=title)

    monkeypatch.setattr(hog, "save_figure", spy)
    out = tmp_path / "figure.png"
    argv = ["visualize", "--checkpoint", str(runs[name]), "--images", str(images), "--output", str(out)]
    assert main([*argv, "--seed", str(SEED), "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100

    ((figure, title),) = drawn
    method, _, ratio = RUNS[name]
    assert title is not None and title.startswith(f"{method.upper()} reconstruction, mask ratio {ratio:.0%}"), title
    if method == "maskfeat":  # the HOG grid: the target's and the prediction's orientations
        assert set(figure) == {"original", "target", "prediction", "mask"}
        assert title.endswith(HOG_FIGURE_NOTE)
    else:  # pixels
        assert {"original", "masked", "reconstruction", "pasted", "mask"} <= set(figure)
        assert HOG_FIGURE_NOTE not in title
    assert torch.equal(figure["mask"].float(), expected_pixel_mask(runs[name]))  # whole units, the run's ratio


def test_another_mask_ratio_than_the_runs_is_one_line_for_simmim(
    runs: dict[str, Path], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figure.png"
    argv = ["visualize", "--checkpoint", str(runs["simmim-swin"]), "--images", str(images), "--output", str(out)]
    err = error_line(capsys, [*argv, "--mask-ratio", "0.3", "--device", "cpu"])
    assert err == (
        "maelab: error: invalid --mask-ratio 0.3: a simmim run masks the ratio it was trained with (0.6); "
        "--mask-ratio is for MAE runs"
    )
    assert not out.exists()
    assert main([*argv, "--mask-ratio", "0.6", "--device", "cpu"]) == 0  # the run's own ratio is fine
    assert out.exists()
