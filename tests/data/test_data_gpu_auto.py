"""gpu_resident=auto for image folders: decided from a peek at file headers, before decoding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from maelab.data.resident import AUTO_MAX_SIDE, fits_in_memory, peek_image_sizes, plan_gpu_resident, resident_size

GiB = 1 << 30


def _files(tmp_path, sizes):
    paths = []
    for k, (w, h) in enumerate(sizes):
        p = tmp_path / f"{k:03d}.jpg"
        Image.new("RGB", (w, h), (k, 2 * k, 3 * k)).save(p)
        paths.append(str(p))
    return paths


def test_peek_reads_headers_of_evenly_spaced_files(tmp_path):
    paths = _files(tmp_path, [(32, 32)] * 9 + [(50, 40)])
    assert peek_image_sizes(paths) == [(32, 32)] * 9 + [(40, 50)]  # (h, w)
    assert peek_image_sizes(paths, count=3) == [(32, 32)] * 3  # files 0, 3, 6
    # headers only: a file cut after its header still gives its size; unreadable files are left out
    data = open(paths[0], "rb").read()
    (tmp_path / "000.jpg").write_bytes(data[:-5])  # a full decode would fail
    (tmp_path / "001.jpg").write_bytes(b"")
    (tmp_path / "002.jpg").write_bytes(b"not an image")
    assert peek_image_sizes(paths[:3]) == [(32, 32)]
    assert peek_image_sizes([]) == []


def test_resident_size():
    assert resident_size([(32, 32)] * 4, 224) == (32, 32)  # common small size: kept
    assert resident_size([(24, 40)], (32, 32)) == (24, 40)
    assert resident_size([(32, 32), (28, 32)], 48) == (48, 48)  # sizes differ: the model's input size
    assert resident_size([(96, 96)], 64) == (64, 64)  # common but large: the model's input size
    assert resident_size([], (16, 24)) == (16, 24)


def test_plan_gpu_resident_decides_without_cuda():
    small = [(32, 32)] * 5
    kw = dict(num_images=50_000, channels=3, img_size=224)
    assert plan_gpu_resident("auto", "cuda", sizes=small, free_bytes=GiB, **kw) == (32, 32)  # 150 MB of 1 GiB
    assert plan_gpu_resident("auto", "cuda:1", sizes=small, free_bytes=GiB // 2, **kw) is None  # > a quarter
    assert plan_gpu_resident("auto", "cpu", sizes=small, free_bytes=GiB, **kw) is None
    assert plan_gpu_resident("auto", "cuda", sizes=small + [(AUTO_MAX_SIDE + 1, 8)], free_bytes=GiB, **kw) is None
    assert plan_gpu_resident("auto", "cuda", sizes=[], free_bytes=GiB, **kw) is None  # nothing readable peeked
    # small but mixed sizes: stored at the model's input size, which must then fit
    mixed = [(32, 32), (30, 32)]
    assert plan_gpu_resident("auto", "cuda", 1000, 3, mixed, 48, free_bytes=GiB) == (48, 48)
    assert plan_gpu_resident("auto", "cuda", 50_000, 3, mixed, 224, free_bytes=GiB) is None
    assert plan_gpu_resident("on", "cpu", sizes=[(500, 375)], **kw) == (224, 224)
    assert plan_gpu_resident("on", "cpu", sizes=small, **kw) == (32, 32)
    assert plan_gpu_resident("off", "cuda", sizes=small, free_bytes=GiB, **kw) is None
    with pytest.raises(ValueError, match="auto, on or off"):
        plan_gpu_resident("yes", "cuda", sizes=small, **kw)


def test_plan_gpu_resident_leaves_room_on_the_host():
    """Every rank on a node decodes the set into host memory at once: auto needs them to fit in half of it."""
    kw = dict(num_images=50_000, channels=3, sizes=[(32, 32)], img_size=32, free_bytes=64 * GiB)  # 154 MB a copy
    assert plan_gpu_resident("auto", "cuda", host_free_bytes=4 * GiB, procs_on_node=8, **kw) == (32, 32)
    assert plan_gpu_resident("auto", "cuda", host_free_bytes=2 * GiB, procs_on_node=8, **kw) is None
    assert plan_gpu_resident("on", "cuda", host_free_bytes=1, procs_on_node=8, **kw) == (32, 32)  # on: as asked


def test_fits_in_memory_queries_cuda_only_without_free_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append(device) or (GiB, 4 * GiB))
    assert fits_in_memory(1000, 3, 32, 32, "cuda", free_bytes=GiB) and not calls
    assert fits_in_memory(1000, 3, 32, 32, "cuda") and len(calls) == 1
