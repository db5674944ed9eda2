"""WebDataset shards (``maelab shard``, :class:`ShardStream`) and Hugging Face datasets on disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import error_line

from maelab.cli import main
from maelab.data.hf_datasets import HFImageDataset, load_hf_table
from maelab.data.shards import ShardStream, build_stream_loader, write_shards
from maelab.data.transforms import pretrain_transform
from maelab.errors import DataError

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

N_IMAGES = 24
PICO = ["--model", "mae_vit_pico_patch4_32", "--device", "cpu", "--no-progress", "--epochs", "1"]


def _images(root: Path, n: int = N_IMAGES) -> list[np.ndarray]:
    """``n`` distinct 8x8 PNGs in two class folders (a/, b/), returned as arrays in scan order."""
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        cls = "ab"[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / cls / f"img{i:03d}.v1.png")  # a dot in the stem too
        arrays.append(arr)
    return arrays


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    _images(root)
    return root


def _shards(folder: Path, tmp_path: Path, size: int) -> Path:
    out = tmp_path / f"shards{size}"
    write_shards(folder, out, size)
    return out


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))


def test_shard_cli_writes_file_bytes_labels_and_index(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sh"
    assert main(["shard", "--data", str(folder), "--output", str(out), "--shard-size", "5"]) == 0
    assert "24 images in 5 shards" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["a", "b"] and index["num_samples"] == N_IMAGES
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    seen = {}
    for s in index["shards"]:
        for sample in wds.tariterators.tarfile_samples([{"url": str(out / s["name"])}]):
            seen[sample["__key__"]] = sample
    assert len(seen) == N_IMAGES
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder).with_suffix("").as_posix().replace(".", "%2E")
        assert seen[rel]["png"] == path.read_bytes()
        assert int(seen[rel]["cls"]) == "ab".index(path.parent.name)


def _loader_pixels(stream: ShardStream, batch_size: int, workers: int) -> list[torch.Tensor]:
    stream.transform = _pixels
    return [b for b, _ in build_stream_loader(stream, batch_size, workers)]


@pytest.mark.parametrize("shard_size", [6, 12])  # 4 shards (one per slot) and 2 shards (shared by 2 slots)
def test_every_sample_once_across_2_ranks_x_2_workers(folder: Path, tmp_path: Path, shard_size: int) -> None:
    shards = _shards(folder, tmp_path, shard_size)
    originals = {np.array(Image.open(p).convert("RGB")).tobytes() for p in folder.rglob("*.png")}
    seen = []
    for rank in range(2):
        stream = ShardStream(str(shards), seed=3, rank=rank, world_size=2)
        batches = _loader_pixels(stream, batch_size=2, workers=2)
        assert len(batches) == N_IMAGES // 2 // 2
        seen += [img.numpy().tobytes() for b in batches for img in b]
    assert len(seen) == N_IMAGES and set(seen) == originals


def test_labels_follow_their_images(folder: Path, tmp_path: Path) -> None:
    stream = ShardStream(str(_shards(folder, tmp_path, 5)) + "/shard-{000000..000004}.tar", seed=0)
    stream.set_batching(1, 0)
    by_pixels = {
        np.array(Image.open(p).convert("RGB")).tobytes(): "ab".index(p.parent.name) for p in folder.rglob("*.png")
    }
    items = list(stream)
    assert len(items) == N_IMAGES
    assert all(by_pixels[np.array(img).tobytes()] == label for img, label in items)


def test_resume_mid_epoch_gives_the_same_batches(folder: Path, tmp_path: Path) -> None:
    """Same world size and workers: batches k.. after set_epoch(e, start=k*bs) equal the full epoch's,
    augmentation included (k odd, so the workers' lanes rotate)."""
    stream = ShardStream(
        str(_shards(folder, tmp_path, 6)), seed=5, transform=pretrain_transform(8, (0.5,) * 3, (0.5,) * 3)
    )
    loader = build_stream_loader(stream, batch_size=3, num_workers=2)
    stream.set_epoch(1)
    full = [b for b, _ in loader]
    assert len(full) == N_IMAGES // 3
    stream.set_epoch(1, start=3 * 3)
    resumed = [b for b, _ in loader]
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stream.set_epoch(2)
    assert not torch.equal(torch.cat([b for b, _ in loader]), torch.cat(full))  # a new order each epoch


def test_unreadable_sample_replaced_or_strict(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    out.mkdir()
    with wds.ShardWriter(str(out / "s-%02d.tar"), maxcount=100, verbose=0) as w:
        paths = sorted(folder.rglob("*.png"))[:4]
        for i, p in enumerate(paths):
            w.write({"__key__": f"k{i}", "png": b"not an image" if i == 1 else p.read_bytes(), "cls": 0})
    stream = ShardStream(str(out / "s-00.tar"), seed=0)
    stream.set_batching(4, 0)
    good = {np.array(Image.open(p).convert("RGB")).tobytes() for i, p in enumerate(paths) if i != 1}
    items = list(stream)
    assert len(items) == 4 and stream.num_skipped == 1
    assert all(np.array(img).tobytes() in good for img, _ in items)
    strict = ShardStream(str(out / "s-00.tar"), seed=0, strict=True)
    strict.set_batching(4, 0)
    with pytest.raises(DataError, match=r"s-00.tar:k1: not a recognised image format"):
        list(strict)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_pretrain_on_shards_and_resume_is_exact(folder: Path, tmp_path: Path) -> None:
    shards = _shards(folder, tmp_path, 6)
    common = ["pretrain", "--data", str(shards), "--batch-size", "8", "--num-workers", "2", *PICO]
    assert main([*common, "--output", str(tmp_path / "full")]) == 0
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == N_IMAGES // 8  # the epoch length comes from index.json
    # stopped after 1 of 3 batches: the workers' lanes rotate on resume
    assert main([*common, "--output", str(tmp_path / "part"), "--max-steps", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "part"), "--resume"]) == 0
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=0, atol=0, msg=k)


def _torchrun(args: list[str], nproc: int = 2) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "maelab"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# torchrun launches (13 s, and 30 s resumed): -m slow. Default suite: test_every_sample_once_across_2_ranks_x_2_workers
# (the stream split over processes x workers) and tests/engine/test_distributed.py (2 processes on one loop)
@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_two_processes_pretrain_on_shards(folder: Path, tmp_path: Path, resume: bool) -> None:
    # 4 shards of 6 over 2 processes x 2 workers: each reader one shard, every image once per epoch
    shards = _shards(folder, tmp_path, 6)
    common = ["pretrain", "--data", str(shards), "--batch-size", "4", "--num-workers", "2", *PICO, "--epochs", "2"]
    _torchrun([*common, "--output", str(tmp_path / "full")])
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]  # 24 images / (4 x 2 processes) steps per epoch, on both ranks
    assert all(np.isfinite(r["loss"]) for r in records)
    if resume:  # stopped mid-epoch by 2 processes, continued by 2 processes with the same workers: exact
        _torchrun([*common, "--output", str(tmp_path / "part"), "--max-steps", "4"])
        _torchrun([*common, "--output", str(tmp_path / "part"), "--resume"])
        full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
        for k in full:
            torch.testing.assert_close(part[k], full[k], rtol=0, atol=0, msg=k)


def _hf_table(folder: Path) -> object:
    paths = sorted(folder.rglob("*.png"))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]), "note": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in paths],
            "label": ["ab".index(p.parent.name) for p in paths],
            "note": ["x"] * len(paths),
        },
        features=features,
    )


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_pretrain_on_hf_dataset(folder: Path, tmp_path: Path, layout: str) -> None:
    table, root = _hf_table(folder), tmp_path / "hf"
    if layout == "save_to_disk":
        table.save_to_disk(str(root))
    else:
        root.mkdir()
        table.to_parquet(str(root / "train-00000-of-00001.parquet"))
    ds = HFImageDataset(load_hf_table(root, "train", True), root)
    assert ds.classes == ["a", "b"] and len(ds) == N_IMAGES
    for i, path in enumerate(sorted(folder.rglob("*.png"))):
        img, label = ds[i]
        assert np.array_equal(np.array(img), np.array(Image.open(path).convert("RGB")))
        assert label == "ab".index(path.parent.name)
    out = tmp_path / "run"
    assert (
        main(["pretrain", "--data", str(root), "--batch-size", "12", "--num-workers", "0", *PICO, "--output", str(out)])
        == 0
    )
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == N_IMAGES // 12


def test_hf_unreadable_row_skipped_or_strict(folder: Path, tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image()})
    good = sorted(folder.rglob("*.png"))[0].read_bytes()
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": b"junk", "path": None}]}, features=features
    )
    ds = HFImageDataset(table, tmp_path)
    assert not ds.labeled and ds[1][1] == -1 and ds.num_skipped == 1
    with pytest.raises(DataError, match=r"/row1: not a recognised image format"):
        HFImageDataset(table, tmp_path, strict=True)[1]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{tmp}/missing/shard-{{000000..000003}}.tar", "shard not found: {tmp}/missing/shard-000000.tar (and 3 more)"),
        ("{tmp}/garbage.tar", "cannot read shards"),
        ("{tmp}/badindex", "cannot read shard index {tmp}/badindex/index.json"),
    ],
)
def test_bad_shard_spec_is_one_line(tmp_path: Path, capsys, spec: str, message: str) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 40)
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "index.json").write_text('{"format": "webdataset", "shards": [{"name": 1}]}')
    err = error_line(capsys, ["pretrain", "--data", spec.format(tmp=tmp_path), *PICO, "--output", str(tmp_path / "r")])
    assert message.format(tmp=tmp_path) in err


def test_missing_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(DataError, match=r"pip install 'maelab\[shards\]'"):
        write_shards(tmp_path, tmp_path / "out", 10)


def test_hf_image_column_and_splits(folder: Path, tmp_path: Path) -> None:
    """data.image_column picks the column; a saved DatasetDict gives data.split for training, test for evaluation."""
    paths = sorted(folder.rglob("*.png"))
    features = datasets.Features({"thumb": datasets.Image(), "full": datasets.Image()})
    table = datasets.Dataset.from_dict(
        {"thumb": [str(paths[0])] * 3, "full": [str(p) for p in paths[:3]]}, features=features
    )
    ds = HFImageDataset(table, tmp_path, image_column="full")
    assert np.array_equal(np.array(ds[2][0]), np.array(Image.open(paths[2]).convert("RGB")))
    with pytest.raises(DataError, match=r"no image column 'nope' \(data.image_column\); columns: thumb, full"):
        HFImageDataset(table, tmp_path, image_column="nope")
    root = tmp_path / "dd"
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(root))
    assert len(load_hf_table(root, "train", True)) == 3 and len(load_hf_table(root, "train", False)) == 1
    with pytest.raises(DataError, match=r"no split 'unlabeled' \(data.split\); it has: train, test"):
        load_hf_table(root, "unlabeled", True)


def test_epoch_length_counted_without_index(folder: Path, tmp_path: Path) -> None:
    shards = _shards(folder, tmp_path, 5)
    (shards / "index.json").unlink()
    stream = ShardStream(str(shards / "shard-{000000..000004}.tar"))
    assert stream.num_samples == N_IMAGES and stream.counts == [5, 5, 5, 5, 4]


@pytest.mark.parametrize("source", ["shards", "save_to_disk"])
def test_embed_reads_shards_and_hf_datasets(folder: Path, tmp_path: Path, source: str) -> None:
    """maelab embed on shards / a saved HF dataset: one row per image, the same features and labels as on the
    folder they were made from, rows named by shard:key or row<i>."""
    from safetensors.torch import load_file

    import maelab
    from maelab.models.weights import export_encoder

    if source == "shards":
        data = _shards(folder, tmp_path, 10)
    else:
        data = tmp_path / "hf"
        _hf_table(folder).save_to_disk(str(data))
    ckpt = export_encoder(maelab.create_model("mae_vit_pico_patch4_32"), tmp_path / "enc.safetensors")
    outs = {}
    for name, src in (("folder", folder), (source, data)):
        out = tmp_path / f"{name}.safetensors"
        assert (
            main(
                [
                    "embed",
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    str(src),
                    "--output",
                    str(out),
                    "--device",
                    "cpu",
                    "--num-workers",
                    "0",
                    "--no-progress",
                ]
            )
            == 0
        )
        outs[name] = (load_file(out), (tmp_path / f"{name}.files.txt").read_text().split())
    (ref, ref_files), (got, got_files) = outs["folder"], outs[source]
    expected = (
        [f"shard-{i // 10:06d}.tar:{Path(f).with_suffix('').as_posix()}" for i, f in enumerate(ref_files)]
        if source == "shards"
        else [f"row{i}" for i in range(N_IMAGES)]
    )
    assert got_files == expected
    torch.testing.assert_close(got["features"], ref["features"], rtol=0, atol=0)
    assert torch.equal(got["labels"], ref["labels"])
