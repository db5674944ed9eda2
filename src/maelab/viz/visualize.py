"""``maelab visualize``: reconstruct a user's own images from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from maelab.data import default_stats, eval_transform, load_image
from maelab.data.folders import IMG_EXTENSIONS, scan_images
from maelab.engine.checkpoint import load_pretrained_with_config
from maelab.engine.runtime import resolve_device
from maelab.errors import DataError
from maelab.models.masking import make_noise
from maelab.viz.reconstruction import default_title


def collect_images(inputs: list[str], limit: int) -> list[Path]:
    """Image files from a list of files and folders (folders searched recursively, sorted)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [Path(f) for f in scan_images(str(p))]
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image not found: {p}")
    if not found:
        raise DataError(f"no images in {', '.join(inputs)} (looked for {', '.join(IMG_EXTENSIONS)})")
    return found[:limit]


@torch.no_grad()
def visualize_images(
    checkpoint: str,
    inputs: list[str],
    output: str,
    mask_ratio: float | None = None,
    seed: int = 0,
    device: str = "auto",
    max_images: int = 8,
) -> Path:
    """Write the run's figure for the given images (what its method predicts: pixels, the HOG target against
    the prediction, or BEiT's decoded codes); returns the PNG path. ``mask_ratio`` overrides an MAE run's ratio."""
    from maelab.methods import figure_note, get_method
    from maelab.viz.hog import save_figure

    model, run_cfg = load_pretrained_with_config(checkpoint, need_decoder=True)
    cfg = model.cfg
    method = get_method((run_cfg or {}).get("method", "mae"))
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    if not 0.0 <= ratio < 1.0:
        raise DataError(f"invalid --mask-ratio {ratio}: a number in [0, 1)")
    if method.name != "mae" and ratio != cfg.mask_ratio:
        raise DataError(
            f"invalid --mask-ratio {ratio}: a {method.name} run masks the ratio it was trained with "
            f"({cfg.mask_ratio}); --mask-ratio is for MAE runs"
        )
    dev = resolve_device(device)
    model.to(dev).eval()
    mean, std = default_stats(cfg.in_chans)  # the run's own normalization when it recorded one
    data_cfg = (run_cfg or {}).get("data", {})
    mean, std = tuple(data_cfg.get("mean") or mean), tuple(data_cfg.get("std") or std)
    transform = eval_transform(cfg.img_size, mean, std, data_cfg.get("crop_pct", "auto"))
    paths = collect_images(inputs, max_images)
    imgs = torch.stack([transform(load_image(p, channels=cfg.in_chans)) for p in paths])
    gen = torch.Generator().manual_seed(seed)
    if method.name == "mae":  # any ratio: the same noise as facebookresearch/mae's demo
        noise = make_noise(cfg.mask_type, len(paths), cfg.grid_size, ratio, "cpu", generator=gen)
        out = model(imgs.to(dev), mask_ratio=ratio, noise=noise.to(dev))
    else:
        out = model(imgs.to(dev), noise=model.draw_noise(len(paths), "cpu", generator=gen).to(dev))
    images = method.figure(cfg, imgs, out)
    if images is None:
        raise DataError(f"{checkpoint}: a {method.name} run's prediction has no picture")
    title = default_title(cfg.norm_pix_loss, ratio, method=method.name, note=figure_note(method, cfg))
    return save_figure(images, Path(output), mean, std, title=title)
