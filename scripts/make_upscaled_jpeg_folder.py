#!/usr/bin/env python3
"""Make an ImageFolder of larger JPEGs from a small-image folder (e.g. CIFAR-10 at 32 px -> 224 px).

For loader benchmarks at ImageNet-like resolution without ImageNet: every image of SRC
(``SRC/<class>/*``, or a plain tree) is upscaled with Pillow's bicubic filter to SIZE x SIZE
and saved as a JPEG (quality 90 by default) at the same relative path under DST, with a
``.jpg`` suffix. The class layout is kept; ``--limit N`` takes the first N files (sorted) of
each class folder.

    python scripts/make_upscaled_jpeg_folder.py ../shared/data/cifar10/train /tmp/c10_224 --limit 200
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def source_files(src: Path, limit: int | None) -> list[Path]:
    """Image files of ``src``, grouped by their folder, at most ``limit`` (sorted) per folder."""
    groups: dict[Path, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(f for f in filenames if not f.startswith(".") and f.lower().endswith(IMG_SUFFIXES))
        if names:
            groups[Path(dirpath)] = [Path(dirpath) / f for f in names]
    return [p for d in sorted(groups) for p in (groups[d] if limit is None else groups[d][:limit])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="source image folder (e.g. .../cifar10/train)")
    ap.add_argument("dst", type=Path, help="destination folder (created; existing files are overwritten)")
    ap.add_argument("--size", type=int, default=224, help="output side in pixels (default 224)")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per class folder (default: all)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    args = ap.parse_args(argv)
    if not args.src.is_dir():
        ap.error(f"source folder not found: {args.src}")
    if args.size < 1 or not 1 <= args.quality <= 100 or (args.limit is not None and args.limit < 1):
        ap.error("--size and --limit must be positive, --quality in 1..100")
    files = source_files(args.src, args.limit)
    if not files:
        ap.error(f"no images in {args.src}")
    for k, path in enumerate(files, 1):
        out = (args.dst / path.relative_to(args.src)).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(out, quality=args.quality)
        if k % 1000 == 0:
            print(f"{k}/{len(files)}", file=sys.stderr)
    print(f"wrote {len(files)} {args.size}x{args.size} JPEGs to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
