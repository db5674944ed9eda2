"""load_image on every kind of dirty or unusual file."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maelab.data import images as images_mod
from maelab.data import load_image
from maelab.errors import DataError, MaelabError


def _rgb_array(w: int = 16, h: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(w, h)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize(
    "content, name",
    [
        (b"", "zero.jpg"),
        (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "noise.jpg"),
        (b"hello, I am a text file\n" * 20, "notes.png"),
        (_jpeg_bytes()[:300], "truncated.jpg"),
        (_jpeg_bytes()[: len(_jpeg_bytes()) // 2], "half.jpg"),
    ],
)
def test_unreadable_files_raise_data_error(tmp_path, content, name):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read image .*{name}"):
        load_image(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)


def test_zero_byte_reason(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_image(p)


def test_bad_channel_count(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_rgb_array()).save(p)
    with pytest.raises(DataError, match="1 or 3 channels"):
        load_image(p, channels=5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # e.g. Pillow's "Corrupt EXIF data"
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=0, max_size=600),
    prefix=st.sampled_from(
        [
            b"",
            b"\xff\xd8\xff\xe0",
            b"\x89PNG\r\n\x1a\n",
            b"GIF89a",
            b"BM",
            b"P5\n",
            b"II*\x00",
            b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        ]
    ),
)
def test_fuzz_random_bytes_image_or_data_error(tmp_path, data, prefix):
    p = tmp_path / "fuzz.jpg"
    p.write_bytes(prefix + data)
    try:
        img = load_image(p, target_size=16)
    except DataError:
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(24, 20)).save(buf, "PNG")
    return buf.getvalue()


_VALID = {"jpg": _jpeg_bytes(24, 20), "png": _png_bytes()}


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(_VALID)),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
)
def test_fuzz_mutated_images_image_or_data_error(tmp_path, fmt, cut, flips):
    data = bytearray(_VALID[fmt][: max(cut, 1)])
    for pos, val in flips:
        data[pos % len(data)] = val
    p = tmp_path / f"mut.{fmt}"
    p.write_bytes(bytes(data))
    try:
        img = load_image(p)
    except DataError:
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


# ------------------------------------------------------------------ modes


def test_rgb_roundtrip_exact_png(tmp_path):
    arr = _rgb_array()
    p = tmp_path / "x.png"
    Image.fromarray(arr).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(p, "JPEG", quality=95)  # red
    img = load_image(p)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_grayscale_to_rgb_and_l(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (8, 8), 77).save(p)
    assert np.all(np.asarray(load_image(p)) == 77)
    gray = load_image(p, channels=1)
    assert gray.mode == "L" and np.all(np.asarray(gray) == 77)


def test_rgb_to_l(tmp_path):
    p = tmp_path / "c.png"
    Image.new("RGB", (4, 4), (255, 255, 255)).save(p)
    assert np.all(np.asarray(load_image(p, channels=1)) == 255)


def test_palette_png(tmp_path):
    p = tmp_path / "p.png"
    Image.new("RGB", (10, 10), (0, 0, 255)).convert("P").save(p)
    assert Image.open(p).mode == "P"
    assert np.asarray(load_image(p))[0, 0].tolist() == [0, 0, 255]


def test_palette_with_transparency_on_white(tmp_path):
    p = tmp_path / "pt.gif"
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    im.save(p, transparency=1)
    assert np.all(np.asarray(load_image(p)) == 255)


def test_rgba_composited_on_white(tmp_path):
    p = tmp_path / "a.png"
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red ...
    arr[:2, ..., 3] = 255  # ... opaque in the top half, transparent below
    Image.fromarray(arr, "RGBA").save(p)
    out = np.asarray(load_image(p))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 0].tolist() == [255, 255, 255]
    la = tmp_path / "la.png"
    Image.new("LA", (3, 3), (0, 0)).save(la)
    assert np.all(np.asarray(load_image(la, channels=1)) == 255)


def test_1bit_image(tmp_path):
    p = tmp_path / "b.png"
    Image.new("1", (5, 5), 1).save(p)
    assert np.all(np.asarray(load_image(p)) == 255)


@pytest.mark.parametrize("ext", ["png", "tif", "pgm"])
def test_16bit_scaled_not_clipped(tmp_path, ext):
    arr = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    p = tmp_path / f"deep.{ext}"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I;16B", "I;16L", "I")
    out = np.asarray(load_image(p, channels=1)).astype(int)
    expected = np.rint(arr / 257.0).astype(int)
    assert np.abs(out - expected).max() <= 1
    assert out.max() == 255 and out.min() == 0
    assert len(np.unique(out)) > 200  # the range is kept, not clipped to a few values
    assert np.asarray(load_image(p)).shape == (4, 64, 3)


def test_float_image(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.full((3, 3), 0.5, np.float32), "F").save(p)
    assert np.all(np.abs(np.asarray(load_image(p, channels=1)).astype(int) - 128) <= 1)


def test_1x1_image(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    img = load_image(p, target_size=224)
    assert img.size == (1, 1) and np.asarray(img)[0, 0].tolist() == [1, 2, 3]


def test_multiframe_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(p))[0, 0].tolist() == [255, 0, 0]


# ------------------------------------------------------------------ large files


def test_large_jpeg_draft_no_bomb_warning(tmp_path):
    p = tmp_path / "huge.jpg"
    Image.new("L", (12000, 9000), 90).save(p, "JPEG", quality=50)  # 108M px > PIL's 89M limit
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(p, target_size=256)
    assert Image.MAX_IMAGE_PIXELS == limit  # the global limit is restored
    assert img.mode == "RGB" and min(img.size) >= 256 and max(img.size) < 12000
    assert abs(img.width / img.height - 12000 / 9000) < 0.02


def test_large_png_reduced(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("L", (10000, 10000), 200).save(p, compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(p, channels=1, target_size=300)
    assert 300 <= min(img.size) < 600 and np.all(np.asarray(img) == 200)


@pytest.mark.parametrize(
    "mode, ext",
    [
        ("1", "png"),
        ("P", "png"),
        ("I;16", "png"),
        ("CMYK", "jpg"),
        ("LA", "png"),
        ("RGBA", "png"),
        ("F", "tif"),
        ("RGB", "webp"),
    ],
)
def test_reduced_any_mode(tmp_path, mode, ext):
    p = tmp_path / f"m.{ext}"
    Image.new(mode, (200, 100)).save(p)
    img = load_image(p, target_size=20)
    assert img.mode == "RGB" and 20 <= min(img.size) < 40 and img.width == 2 * img.height


def test_too_large_refused(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(p)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 5000)
    with pytest.raises(DataError, match="MAX_PIXELS"):
        load_image(p)


@pytest.mark.slow
def test_large_jpeg_full_decode(tmp_path):
    p = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (1, 2, 3)).save(p, "JPEG", quality=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(p)
    assert img.size == (12000, 9000)


def test_data_error_is_maelab_error():
    assert issubclass(DataError, MaelabError)
