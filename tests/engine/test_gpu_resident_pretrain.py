import json

import pytest
import torch
from PIL import Image
from tests.engine.test_pretrain import assert_same_weights, tiny_cfg, weights

from maelab.config import PretrainConfig, build_config
from maelab.data import pipeline
from maelab.data.jpeg_gpu import JPEGDecodeLoader
from maelab.data.loaders import GPUBatchLoader
from maelab.data.pipeline import TrainingData, TrainingSet, build_training_data, plan_training_set
from maelab.engine.pretrain import pretrain
from maelab.errors import ConfigError
from maelab.models.registry import get_config

STATS = {"mean": (0.5,) * 3, "std": (0.25,) * 3}


def _training_data(cfg: PretrainConfig) -> TrainingData:
    """The data path pre-training takes for ``cfg`` on the CPU."""
    model = get_config(cfg.model, **cfg.model_args)
    return build_training_data(
        cfg.data,
        img_size=model.img_size,
        in_chans=model.in_chans,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=torch.device("cpu"),
        progress=False,
        **STATS,
    )


def test_config_values(tmp_path):
    assert tiny_cfg(tmp_path).data.gpu_resident == "auto"
    assert build_config(PretrainConfig, None, {"data.gpu_resident": True}).data.gpu_resident == "on"
    assert build_config(PretrainConfig, None, {"data.gpu_resident": False}).data.gpu_resident == "off"
    with pytest.raises(Exception, match="gpu_resident"):
        build_config(PretrainConfig, None, {"data.gpu_resident": "maybe"})
    t = _training_data(tiny_cfg(tmp_path / "a"))
    assert not isinstance(t.loader, GPUBatchLoader) and not t.gpu_resident  # auto on CPU: off
    t = _training_data(tiny_cfg(tmp_path / "b", **{"data.gpu_resident": "on"}))
    assert isinstance(t.loader, GPUBatchLoader) and t.gpu_resident and t.description == "GPU-resident"


@pytest.mark.parametrize(
    "accum", [1, pytest.param(2, marks=pytest.mark.slow)]
)  # accumulation: tests/engine/test_loop.py
def test_gpu_resident_resume_exact(tmp_path, accum):
    kw = {"data.gpu_resident": "on", "accum_steps": accum}
    full = tiny_cfg(tmp_path / "full", **kw)
    pretrain(full, progress=False)
    part = tiny_cfg(tmp_path / "part", **kw)
    stopped = pretrain(part, progress=False, max_steps=3)
    assert stopped.stopped_early
    pretrain(part, resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


@pytest.mark.slow  # 3 s; default: test_gpu_resident_resume_exact[1] trains the same path
def test_gpu_resident_loss_falls(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=6, **{"data.num_samples": 128, "data.gpu_resident": "on"})
    pretrain(cfg, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"], [r["loss"] for r in recs]


# ---------------------------------------------------------------- auto for folders, decided before decoding
def _folder(root, sizes, classes=("a", "b")):
    """JPEGs of the given (w, h) sizes, named 000.jpg, 001.jpg, ... and dealt round-robin into class folders."""
    for k, (w, h) in enumerate(sizes):
        p = root / classes[k % len(classes)] / f"{k:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(k)
        arr = (torch.rand((4, 4, 3), generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).resize((w, h), Image.BICUBIC).save(p, quality=90)
    return root


def _fake_cuda_plan(tmp_path, monkeypatch, free=1 << 30, **kw) -> tuple[TrainingSet, list[int]]:
    """plan_training_set for a tiny config on a CUDA device that is never touched (``free`` bytes free);
    with the number of times the dataset was built."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    builds: list[int] = []
    real = pipeline.build_dataset
    monkeypatch.setattr(pipeline, "build_dataset", lambda *a, **k: builds.append(1) or real(*a, **k))
    cfg = tiny_cfg(tmp_path / "run", **kw)
    model = get_config(cfg.model, **cfg.model_args)
    planned = plan_training_set(
        cfg.data, img_size=model.img_size, in_chans=model.in_chans, seed=cfg.seed, device=torch.device("cuda"), **STATS
    )
    return planned, builds


def test_auto_folder_of_small_images_goes_resident_at_its_size(tmp_path, monkeypatch):
    sizes = [(16, 16)] * 40
    sizes[4] = (20, 12)  # file 4 is not among the 32 peeked of 40: resized to the common size
    root = _folder(tmp_path / "data", sizes, classes=("a",))
    (ds, _, store), builds = _fake_cuda_plan(
        tmp_path, monkeypatch, **{"data.name": str(root / "a"), "data.num_workers": 0}
    )
    assert store == (16, 16) and len(builds) == 1
    for i in (0, 4):
        img, _ = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)


def test_auto_folder_mixed_large_or_not_fitting_stays_on_cpu_path(tmp_path, monkeypatch):
    mixed = _folder(tmp_path / "mixed", [(16, 16), (24, 16)] * 4)
    (ds, _, store), builds = _fake_cuda_plan(tmp_path, monkeypatch, **{"data.name": str(mixed)})
    assert store == (32, 32) and ds[1][0].shape == (3, 32, 32) and ds[1][0].dtype == torch.uint8  # model input size

    large = _folder(tmp_path / "large", [(100, 80)] * 8)
    (ds, _, store), builds = _fake_cuda_plan(tmp_path, monkeypatch, **{"data.name": str(large)})
    assert store is None and len(builds) == 1
    # the per-sample pipeline: random crops at the model size, uint8 (DeviceBatches normalizes on the device)
    assert ds[0][0].dtype == torch.uint8 and ds[0][0].shape == (3, 32, 32)

    # synthetic 32 px, but only 1 KiB free: built once, CPU path
    (ds, _, store), builds = _fake_cuda_plan(tmp_path, monkeypatch, free=1 << 10, **{"data.num_samples": 64})
    assert store is None and len(builds) == 1 and ds[0][0].dtype == torch.uint8

    planned, _ = _fake_cuda_plan(tmp_path, monkeypatch, **{"data.name": str(mixed), "data.decode": "gpu"})
    assert planned.store is None  # an explicit decode=gpu turns auto off


def test_auto_real_cifar10_folder_is_peeked_not_decoded(cifar10_dir, tmp_path, monkeypatch):
    (ds, _, store), builds = _fake_cuda_plan(tmp_path, monkeypatch, free=8 << 30, **{"data.name": str(cifar10_dir)})
    assert store == (32, 32) and len(ds) == 50_000 and len(builds) == 1


def test_on_folder_stores_common_size(tmp_path):
    root = _folder(tmp_path / "data", [(16, 16)] * 32)
    t = _training_data(tiny_cfg(tmp_path / "run", **{"data.name": str(root), "data.gpu_resident": "on"}))
    assert isinstance(t.loader, GPUBatchLoader) and t.loader.images.shape == (32, 3, 16, 16)
    imgs, _ = next(iter(t.loader))
    assert imgs.shape == (16, 3, 32, 32)


def test_decode_gpu_pretrain_resumes_exactly(tmp_path):
    """Batches equal the CPU path's (tests/data/test_data_jpeg_gpu.py); here: the wiring and mid-epoch resume."""
    root = _folder(tmp_path / "data", [(40, 36), (36, 44)] * 16)
    kw = {"data.name": str(root), "data.decode": "gpu"}
    t = _training_data(tiny_cfg(tmp_path / "probe", **kw))
    assert isinstance(t.loader, JPEGDecodeLoader) and len(t.loader) == 2 and not t.gpu_resident
    assert t.description == "0 workers read files, JPEGs decoded on cpu"
    pretrain(tiny_cfg(tmp_path / "full", **kw), progress=False)
    part = tiny_cfg(tmp_path / "part", **kw)
    assert pretrain(part, progress=False, max_steps=3).stopped_early  # mid-epoch 2
    pretrain(part, resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_decode_gpu_needs_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="needs an image folder"):
        tiny_cfg(tmp_path, **{"data.decode": "gpu"})
