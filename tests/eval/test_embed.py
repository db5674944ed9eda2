"""``maelab embed``: rows = pooled encoder features of each file under the evaluation transform, in the
folder's sorted order, with labels and the file list; unreadable files left out and listed (or a one-line
error with --strict-data); 2 gloo processes write the same single output as 1 process."""

from __future__ import annotations

import doctest
import importlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.conftest import error_line, random_mae, save_mae
from tests.eval.test_eval_distributed import TINY, run_one, run_two

import maelab
from maelab.data.transforms import default_stats, eval_transform

CLASSES = ("bird", "cat")
PER_CLASS = 6


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory) -> tuple[maelab.MaskedAutoencoder, Path]:
    """A random-init tiny MAE (16 px) and its checkpoint file."""
    mae = random_mae(**TINY).eval()
    return mae, save_mae(mae, tmp_path_factory.mktemp("ckpt") / "mae.pt")


def make_folder(root: Path) -> list[str]:
    """A labeled folder of 2 x 6 random PNGs of different sizes; their paths in sorted (class, name) order."""
    rng = np.random.default_rng(0)
    names = []
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = 18 + 3 * i, 24 - 2 * i
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"img{i:02d}.png")
            names.append(f"{c}/img{i:02d}.png")
    return names


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "imgs"
    return root, make_folder(root)


def direct(mae: maelab.MaskedAutoencoder, path: Path, pool: str) -> torch.Tensor:
    """The feature of one file computed by hand: evaluation transform, forward_features, pooling -> [D]."""
    mean, std = default_stats(3)
    x = eval_transform(mae.cfg.img_size, mean, std)(Image.open(path).convert("RGB"))
    with torch.no_grad():
        tokens = mae.encoder.forward_features(x[None])[0]
    return tokens[0] if pool == "cls" else tokens[1:].mean(0)


def embed_args(ckpt: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "embed",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--output",
        str(output),
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_embed_rows_are_each_files_pooled_features_in_order_with_labels(mae_ckpt, folder, tmp_path):
    mae, ckpt = mae_ckpt
    root, names = folder
    out = tmp_path / "feats.safetensors"
    assert run_one(embed_args(ckpt, root, out, "--pool", "avg", "--batch-size", "5")) == 0
    saved = load_file(str(out))
    assert saved["features"].shape == (12, mae.cfg.embed_dim) and saved["features"].dtype == torch.float32
    assert saved["labels"].tolist() == [0] * PER_CLASS + [1] * PER_CLASS
    assert lines(tmp_path / "feats.files.txt") == names
    for row in (0, 4, 11):  # across batches (of 5) and classes
        torch.testing.assert_close(saved["features"][row], direct(mae, root / names[row], "avg"), rtol=0, atol=1e-5)
    assert not (tmp_path / "feats.skipped.txt").exists()


def test_embed_npy_writes_labels_beside_and_cls_features(mae_ckpt, folder, tmp_path):
    mae, ckpt = mae_ckpt
    root, names = folder
    out = tmp_path / "emb.npy"
    assert run_one(embed_args(ckpt, root, out, "--pool", "cls")) == 0
    feats = np.load(out)
    assert feats.shape == (12, mae.cfg.embed_dim)
    assert np.load(tmp_path / "emb.labels.npy").tolist() == [0] * PER_CLASS + [1] * PER_CLASS
    assert lines(tmp_path / "emb.files.txt") == names
    for row in (2, 9):
        torch.testing.assert_close(
            torch.from_numpy(feats[row]), direct(mae, root / names[row], "cls"), rtol=0, atol=1e-5
        )


def test_embed_unlabeled_tree_has_no_labels(mae_ckpt, tmp_path):
    _, ckpt = mae_ckpt
    root = tmp_path / "loose"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 10, 10)).save(root / f"{i}.png")
    out = tmp_path / "feats.safetensors"
    assert run_one(embed_args(ckpt, root, out)) == 0
    assert set(load_file(str(out))) == {"features"}
    assert lines(tmp_path / "feats.files.txt") == ["0.png", "1.png", "2.png"]


def add_bad_file(root: Path) -> str:
    """A zero-byte image of the first class, sorted between bird/img02.png and bird/img03.png."""
    (root / "bird" / "img02b.png").write_bytes(b"")
    return "bird/img02b.png"


def test_embed_skips_an_unreadable_image_without_a_substitute_and_lists_it(mae_ckpt, folder, tmp_path, caplog):
    mae, ckpt = mae_ckpt
    root, names = folder
    bad = add_bad_file(root)
    out = tmp_path / "feats.safetensors"
    with caplog.at_level(logging.WARNING):
        # batch size 1: the bad file's batch is empty
        assert run_one(embed_args(ckpt, root, out, "--pool", "avg", "--batch-size", "1")) == 0
    saved = load_file(str(out))
    assert lines(tmp_path / "feats.files.txt") == names  # the bad file has no row
    assert lines(tmp_path / "feats.skipped.txt") == [bad]
    assert saved["features"].shape[0] == 12 and saved["labels"].tolist() == [0] * PER_CLASS + [1] * PER_CLASS
    after = names.index("bird/img03.png")  # the files around the bad one keep their own rows and features
    for row in (after - 1, after):
        torch.testing.assert_close(saved["features"][row], direct(mae, root / names[row], "avg"), rtol=0, atol=1e-5)
    assert any("skipped 1 unreadable image" in r.getMessage() for r in caplog.records)


def test_embed_strict_data_stops_with_one_line_error(mae_ckpt, folder, tmp_path, capsys):
    _, ckpt = mae_ckpt
    root, _ = folder
    bad = add_bad_file(root)
    out = tmp_path / "feats.safetensors"
    err = error_line(capsys, embed_args(ckpt, root, out, "--strict-data"))
    assert err.startswith("maelab: error: cannot read image") and bad in err, err
    assert list(tmp_path.glob("feats*")) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "feats.pt"], "invalid output='feats.pt'"),
        (["--data", "synthetic"], "built-in dataset"),
    ],
)
def test_embed_refuses_bad_output_or_data_in_one_line(mae_ckpt, folder, tmp_path, capsys, argv, message):
    _, ckpt = mae_ckpt
    root, _ = folder
    args = embed_args(ckpt, root, tmp_path / "feats.safetensors") + argv  # the later flag wins
    assert message in error_line(capsys, args)


@pytest.mark.slow  # 8 s; default suite: the 1-process embed tests
def test_embed_two_processes_write_the_one_process_output_once(mae_ckpt, folder, tmp_path):
    """13 files (one unreadable) over 2 ranks: uneven shards, a skip on one rank, the same rows."""
    _, ckpt = mae_ckpt
    root, _ = folder
    add_bad_file(root)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_one(embed_args(ckpt, root, one / "feats.safetensors", "--batch-size", "3")) == 0
    run_two(embed_args(ckpt, root, two / "feats.safetensors", "--batch-size", "2"), summary="wrote")
    assert sorted(p.name for p in two.iterdir()) == ["feats.files.txt", "feats.safetensors", "feats.skipped.txt"]
    a, b = load_file(str(one / "feats.safetensors")), load_file(str(two / "feats.safetensors"))
    torch.testing.assert_close(b["features"], a["features"], rtol=0, atol=1e-6)
    assert torch.equal(b["labels"], a["labels"])
    for name in ("feats.files.txt", "feats.skipped.txt"):
        assert lines(two / name) == lines(one / name)


GATHER_SCRIPT = """
import torch, torch.distributed as dist
import maelab
from maelab.engine.distributed import DistInfo
from maelab.eval.embed import embed_rows
from maelab.eval.features import encode

class Items(torch.utils.data.Dataset):  # 5 images, item 3 unreadable: shards of 3 and 2 rows
    def __len__(self):
        return 5
    def __getitem__(self, i):
        return None if i == 3 else (torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), i)

dist.init_process_group("gloo")
torch.manual_seed(0)
encoder = maelab.create_model("mae_vit_pico_patch4_32", **TINY).encoder.eval()
info = DistInfo(dist.get_rank(), dist.get_world_size())
out = embed_rows(encoder, Items(), "avg", torch.device("cpu"), batch_size=2, num_workers=0, dtype=torch.float32,
                 info=info, progress=False)
if info.rank == 0:
    feats, ok = out
    assert feats.device.type == "cpu" and ok.tolist() == [True, True, True, False, True], ok
    with torch.no_grad():
        ref = torch.stack([encode(encoder, Items()[i][0][None], "avg")[0] if i != 3 else torch.zeros(64)
                           for i in range(5)])
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-6)
    print("rank 0 holds the rows in order")
else:
    assert out is None, "rank 1 must hold its own shard only, not the gathered rows"
dist.destroy_process_group()
"""


@pytest.mark.slow  # 10 s; default suite: test_embed_two_processes_write_the_one_process_output_once
def test_embed_rows_are_gathered_onto_rank_0_only_in_dataset_order(tmp_path):
    """Under torchrun only rank 0 receives the features (on its CPU, in dataset order, uneven shards, an
    unreadable item left zero); rank 1 gets None instead of a copy of all N x D rows."""
    script = tmp_path / "gather.py"
    script.write_text(f"TINY = {TINY!r}\n" + GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 holds the rows in order" in proc.stdout


def test_embed_docstring_example_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's mkdtemp lands in tmp_path
    module = importlib.import_module("maelab.eval.embed")  # maelab.eval.embed is also the function
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
