"""scripts/make_upscaled_jpeg_folder.py: a bigger-JPEG copy of a small-image folder, same class layout."""

from __future__ import annotations

import pytest
from PIL import Image
from tests.conftest import load_script


def test_upscales_with_class_layout_and_limit(tmp_path, capsys):
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / cls / f"{i}.png")
    (src / "cat" / "notes.txt").write_text("not an image")
    assert (
        load_script("make_upscaled_jpeg_folder").main([str(src), str(tmp_path / "dst"), "--size", "24", "--limit", "2"])
        == 0
    )
    out = sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*"))
    assert out == ["cat", "cat/0.jpg", "cat/1.jpg", "dog", "dog/0.jpg", "dog/1.jpg"]
    with Image.open(tmp_path / "dst" / "dog" / "1.jpg") as img:
        assert img.format == "JPEG" and img.size == (24, 24) and img.mode == "RGB"
        assert abs(img.getpixel((12, 12))[0] - 40) <= 3
    assert "wrote 4 24x24 JPEGs" in capsys.readouterr().out


def test_rejects_a_missing_source(tmp_path):
    with pytest.raises(SystemExit):
        load_script("make_upscaled_jpeg_folder").main([str(tmp_path / "nope"), str(tmp_path / "dst")])
