"""data.decode=gpu: workers read file bytes, the device decodes and augments each batch.

All on CPU (decode_jpeg takes the same list there); one test compares with CUDA when present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.config import DataConfig, PretrainConfig, build_config
from maelab.data import ImageFolderDataset, jpeg_gpu, pretrain_transform
from maelab.data.jpeg_gpu import EncodedImageFolder, JPEGDecodeLoader, device_decodable, resolve_decode
from maelab.data.loader import ResumableSampler, build_loader
from maelab.errors import ConfigError, DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UINT8_LEVEL = 1.0 / 255 / min(STD)
"""One uint8 level after normalization (the CUDA decoder's allowance; on CPU the paths are bit-identical)."""


def _jpeg(path, size, seed, mode="RGB", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth random colors (a 4x4 grid upscaled) compress like photos, unlike pure noise
    arr = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((w, h), Image.BICUBIC)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **({"quality": 90, **kw} if path.suffix == ".jpg" else kw))
    return path


def _folder(root, n_per_class=6):
    for c, cls in enumerate(("cat", "dog")):
        for i in range(n_per_class):
            _jpeg(root / cls / f"{i}.jpg", (40 + 7 * i, 36 + 5 * c), seed=10 * c + i)
    return root


def _loader_pair(
    root,
    *,
    batch=4,
    img_size=24,
    min_scale=0.2,
    hflip=True,
    workers=0,
    channels=3,
    strict=False,
    ratio=(3 / 4, 4 / 3),
    seed=3,
):
    """(CPU-path DataLoader, JPEGDecodeLoader) over the same files and one sampler each."""
    mean, std = (MEAN, STD) if channels == 3 else ((0.5,), (0.5,))
    cpu_ds = ImageFolderDataset(
        root,
        transform=pretrain_transform(img_size, mean, std, min_scale, hflip),
        channels=channels,
        strict=strict,
        target_size=100,
    )
    s_cpu = ResumableSampler(len(cpu_ds), seed=seed)
    s_dev = ResumableSampler(len(cpu_ds), seed=seed)
    dev_ds = ImageFolderDataset(root, channels=channels, strict=strict, target_size=100)
    dev = JPEGDecodeLoader(
        dev_ds,
        batch,
        s_dev,
        img_size,
        mean,
        std,
        "cpu",
        num_workers=workers,
        min_scale=min_scale,
        hflip=hflip,
        ratio=ratio,
    )
    return build_loader(cpu_ds, batch, s_cpu, 0), s_cpu, dev, s_dev


def test_config_decode_values():
    assert DataConfig().decode == "auto" and resolve_decode("auto") == "cpu" and resolve_decode("gpu") == "gpu"
    assert build_config(PretrainConfig, None, {"data.name": "/some/folder", "data.decode": "gpu"}).data.decode == "gpu"
    with pytest.raises(ConfigError, match=r"data.decode='fast': auto, cpu or gpu"):
        build_config(PretrainConfig, None, {"data.decode": "fast"})
    with pytest.raises(ConfigError, match="needs an image folder") as e:
        build_config(PretrainConfig, None, {"data.name": "cifar10", "data.decode": "gpu"})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="gpu_resident=on"):
        build_config(PretrainConfig, None, {"data.name": "/f", "data.decode": "gpu", "data.gpu_resident": "on"})


def test_device_decodable_routes_files(tmp_path):
    rgb = _jpeg(tmp_path / "rgb.jpg", (20, 16), 0).read_bytes()
    assert device_decodable(rgb)
    assert device_decodable(_jpeg(tmp_path / "g.jpg", (20, 16), 1, mode="L").read_bytes())
    assert device_decodable(_jpeg(tmp_path / "p.jpg", (20, 16), 1, progressive=True).read_bytes())
    assert not device_decodable(_jpeg(tmp_path / "c.jpg", (20, 16), 2, mode="CMYK").read_bytes())
    assert not device_decodable(_jpeg(tmp_path / "x.png", (20, 16), 3).read_bytes())
    assert not device_decodable(rgb[: len(rgb) // 2])  # truncated: no end-of-image marker
    assert not device_decodable(b"")


def test_encoded_items_are_bytes_or_decoded_pixels(tmp_path):
    root = _folder(tmp_path / "data", 2)
    _jpeg(root / "dog" / "z.png", (20, 16), 3)
    ds = EncodedImageFolder(ImageFolderDataset(root))
    kinds = {ds.folder.samples[i][0].rsplit(".", 1)[1]: ds[(i, 7)] for i in range(len(ds))}
    payload, label, seed, i = kinds["jpg"]
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and seed == 7 and label in (0, 1)
    assert bytes(payload.numpy()) == open(ds.folder.samples[i][0], "rb").read()
    png, label, _, _ = kinds["png"]
    assert png.shape == (3, 16, 20) and png.dtype == torch.uint8 and label == 1


def test_batches_shape_dtype_range(tmp_path):
    _, _, dev, sampler = _loader_pair(_folder(tmp_path / "data"), batch=4, img_size=(24, 16))
    sampler.set_epoch(0)
    batches = list(dev)
    assert len(batches) == len(dev) == 3
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    for imgs, labels in batches:
        assert imgs.shape == (4, 3, 24, 16) and imgs.dtype == torch.float32 and imgs.device.type == "cpu"
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert lo - 1e-5 <= imgs.min() and imgs.max() <= hi + 1e-5


@pytest.mark.parametrize("augment", [False, True], ids=["full-image-no-flip", "paper-augmentation"])
def test_matches_cpu_pil_path(tmp_path, augment):
    """Same crops and flips as pretrain_transform and, on CPU (libjpeg-turbo = Pillow), the same pixels bit for bit."""
    kw = dict(min_scale=0.2, hflip=True) if augment else dict(min_scale=1.0, hflip=False)
    cpu, s_cpu, dev, s_dev = _loader_pair(_folder(tmp_path / "data"), **kw)
    for epoch in (0, 1):
        s_cpu.set_epoch(epoch)
        s_dev.set_epoch(epoch)
        for (x, y), (u, v) in zip(cpu, dev, strict=True):
            assert torch.equal(y, v)
            assert torch.equal(x, u)


def test_deterministic_and_resumes_mid_epoch(tmp_path):
    _, _, dev, sampler = _loader_pair(_folder(tmp_path / "data"), batch=2, workers=2)
    sampler.set_epoch(1)
    full = list(dev)
    again = list(dev)
    sampler.set_epoch(1, start=2 * 2)  # resume after two batches
    tail = list(dev)
    assert len(tail) == len(full) - 2
    for (a, la), (b, lb) in zip(full, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(full[2:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(dev))[0], full[0][0])
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    list(dev)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is left alone


def test_odd_files_fall_back_to_pil_and_bad_ones_are_skipped(tmp_path, caplog):
    root = _folder(tmp_path / "data", 3)
    _jpeg(root / "cat" / "gray.jpg", (30, 30), 5, mode="L")
    _jpeg(root / "cat" / "cmyk.jpg", (30, 26), 6, mode="CMYK")
    _jpeg(root / "dog" / "png.png", (25, 30), 7)
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    cpu, s_cpu, dev, s_dev = _loader_pair(root, batch=4)
    s_cpu.set_epoch(0)
    s_dev.set_epoch(0)
    for (x, y), (u, v) in zip(cpu, dev, strict=True):  # same replacements and pixels as the CPU path
        assert torch.equal(y, v) and torch.equal(x, u)
    assert dev.folder.num_skipped == 2 and "skipping unreadable image" in caplog.text

    _, _, strict, s = _loader_pair(root, batch=4, strict=True)
    s.set_epoch(0)
    with pytest.raises(DataError, match=r"(trunc|empty)\.jpg"):
        list(strict)


def test_pil_fallback_when_decode_jpeg_refuses(tmp_path, monkeypatch):
    cpu, s_cpu, dev, s_dev = _loader_pair(_folder(tmp_path / "data"))

    def refuse(*args, **kwargs):
        raise RuntimeError("decode_jpeg: unsupported")

    monkeypatch.setattr(jpeg_gpu, "_decode", refuse)
    s_cpu.set_epoch(0)
    s_dev.set_epoch(0)
    for (x, _), (u, _) in zip(cpu, dev, strict=True):
        assert torch.equal(x, u)


def test_a_file_the_batched_decoder_rejects_leaves_the_others_batched(tmp_path, monkeypatch):
    """One rejected file in a batch of 8: the batch is split in halves around it (4, 2 and 1 decoded together),
    only that file goes to Pillow, and the pixels equal the CPU path's."""
    root = _folder(tmp_path / "data", 4)
    cpu, s_cpu, dev, s_dev = _loader_pair(root, batch=8)
    bad = (root / "dog" / "2.jpg").read_bytes()
    decoded, pillow = [], []
    real_decode, real_pil = jpeg_gpu._decode, dev._pil

    def decode(data, *args):
        if any(bytes(t.numpy()) == bad for t in data):
            raise RuntimeError("decode_jpeg: unsupported")
        decoded.append(len(data))
        return real_decode(data, *args)

    monkeypatch.setattr(jpeg_gpu, "_decode", decode)
    monkeypatch.setattr(dev, "_pil", lambda i: pillow.append(i) or real_pil(i))
    s_cpu.set_epoch(0)
    s_dev.set_epoch(0)
    for (x, y), (u, v) in zip(cpu, dev, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert sorted(decoded) == [1, 2, 4]
    assert [dev.folder.samples[i][0] for i in pillow] == [str(root / "dog" / "2.jpg")]


def test_batched_resize_groups_images_by_size_and_matches_torchvision(tmp_path, monkeypatch):
    """The CUDA resize (``batched=True``, run here on CPU): one batched call per image size, the pixels
    within one uint8 level of torchvision's per-image uint8 ``resized_crop`` (float weights vs its integer
    kernel), crop boxes and flips included."""
    _, _, dev, _ = _loader_pair(_folder(tmp_path / "data", 1))
    g = torch.Generator().manual_seed(0)
    images = [
        (torch.rand(3, 1, 1, generator=g) * 200 + torch.rand(3, *hw, generator=g) * 55).to(torch.uint8)
        for hw in [(40, 52), (33, 61), (40, 52), (40, 52), (33, 61), (70, 45)]
    ]
    params = dev.params(range(100, 106), [tuple(img.shape[1:]) for img in images])
    assert {flip for _, flip in params} == {False, True}
    calls = []
    real = jpeg_gpu.antialiased_resized_crop
    monkeypatch.setattr(jpeg_gpu, "antialiased_resized_crop", lambda x, *a: calls.append(len(x)) or real(x, *a))
    batched = torch.stack(dev.resize(images, params, batched=True))
    per_image = torch.stack(dev.resize(images, params, batched=False))
    assert sorted(calls) == [1, 2, 3]
    assert batched.dtype == torch.uint8 and (batched.int() - per_image.int()).abs().max() <= 1


def test_one_channel(tmp_path):
    root = _folder(tmp_path / "data", 2)
    _jpeg(root / "cat" / "gray.jpg", (30, 30), 5, mode="L")
    cpu, s_cpu, dev, s_dev = _loader_pair(root, batch=5, channels=1)
    s_cpu.set_epoch(0)
    s_dev.set_epoch(0)
    for (x, _), (u, _) in zip(cpu, dev, strict=True):
        assert u.shape == (5, 1, 24, 24)
        # color JPEGs: libjpeg's luma plane on both paths (Pillow's draft('L')); measured: identical
        assert (x - u).abs().max().item() <= 1 / 255 / 0.5


def test_loader_checks_its_arguments(tmp_path):
    folder = ImageFolderDataset(_folder(tmp_path / "data", 2))
    with pytest.raises(ValueError, match="sampler covers 3"):
        JPEGDecodeLoader(folder, 2, ResumableSampler(3), 24, MEAN, STD, "cpu")
    with pytest.raises(ValueError, match="mean/std need 3"):
        JPEGDecodeLoader(folder, 2, ResumableSampler(4), 24, (0.5,), (0.5,), "cpu")
    with pytest.raises(ValueError, match="ImageFolderDataset"):
        JPEGDecodeLoader([1, 2], 2, ResumableSampler(2), 24, MEAN, STD, "cpu")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_decode_close_to_cpu_path(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu, s_cpu, _, _ = _loader_pair(_folder(tmp_path / "data"))
    folder = ImageFolderDataset(tmp_path / "data", target_size=100)
    s_dev = ResumableSampler(len(folder), seed=3)
    dev = JPEGDecodeLoader(folder, 4, s_dev, 24, MEAN, STD, "cuda")
    s_cpu.set_epoch(0)
    s_dev.set_epoch(0)
    for (x, _), (u, _) in zip(cpu, dev, strict=True):
        assert u.device.type == "cuda"
        # nvJPEG's IDCT/upsampling and the float resize differ from libjpeg-turbo + the uint8 kernel
        assert (x - u.cpu()).abs().mean().item() <= 2 * UINT8_LEVEL


def test_mean_std_made_once_not_per_batch(tmp_path, monkeypatch):
    """From lists, torchvision's normalize copies mean and std to the device at every call (on CUDA a
    blocking copy: the host would wait for the previous training step at every batch)."""
    made = []
    real = jpeg_gpu.stats_tensors
    monkeypatch.setattr(jpeg_gpu, "stats_tensors", lambda *args: made.append(args) or real(*args))
    cpu, s_cpu, dev, s_dev = _loader_pair(_folder(tmp_path / "data"))
    for epoch in (0, 1):
        s_cpu.set_epoch(epoch)
        s_dev.set_epoch(epoch)
        for (x, _), (u, _) in zip(cpu, dev, strict=True):
            assert torch.equal(x, u)
    assert len(made) == 1


@pytest.mark.gpu
def test_cuda_decode_leaves_memory_of_queued_kernels_alone(tmp_path):
    """decode_jpeg's outputs must not reuse blocks that kernels still queued on the current stream read.

    torchvision allocates them on the caller's stream and writes them from nvJPEG's own stream, which
    does not wait for the caller's (pytorch/vision#9606): blocks just freed on the current stream, whose
    readers are still queued, would be overwritten. Here the readers are sums queued behind a sleep."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import math

    folder = ImageFolderDataset(_folder(tmp_path / "data"), target_size=100)
    loader = JPEGDecodeLoader(folder, 4, ResumableSampler(len(folder)), 24, MEAN, STD, "cuda")
    items = [EncodedImageFolder(folder)[(i, 0)] for i in range(len(folder))]
    payloads, files = [p for p, *_ in items], [i for *_, i in items]
    labels = torch.tensor([label for _, label, _, _ in items])
    assert all(p.dim() == 1 for p in payloads)  # every file goes to the device decoder
    shapes = [tuple(img.shape) for img in loader.decode(payloads, files, labels.clone())]
    torch.cuda.synchronize()
    wrong = 0
    for _ in range(10):
        fills = [torch.full(s, 7, dtype=torch.uint8, device="cuda") for s in shapes]  # the decoded sizes
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # about 0.1 s: the sums below wait behind it
        sums = [t.sum(dtype=torch.int64) for t in fills]
        del fills  # their blocks are free for the current stream while the sums are still queued
        loader.decode(payloads, files, labels.clone())
        torch.cuda.synchronize()
        wrong += sum(int(s.item()) != 7 * math.prod(shape) for s, shape in zip(sums, shapes))
    assert wrong == 0
