"""The command line: the main job end to end, and one clear line for every user mistake."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from tests.conftest import TINY_MODEL_ARGS, error_line

from maelab.cli import main

TINY = [f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()]
FAST = ["--epochs", "2", "--batch-size", "16", "--num-workers", "0", "data.num_samples=64", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["pretrain", "--output", str(out), *FAST, *TINY]) == 0
    return out


@pytest.mark.slow  # 8 s; the signal tests run pretrain as real processes
def test_pretrain_as_a_real_subprocess(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "maelab", "pretrain", "--output", str(out), *FAST, "--epochs", "1", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout
    assert (out / "checkpoints" / "last.pt").exists() and (out / "metrics.jsonl").exists()
    assert list((out / "figures").glob("reconstruction_*.png"))


def test_export_loads_into_timm_with_same_features(run_dir, tmp_path, capsys):
    enc = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(enc)]) == 0
    assert "timm.create_model" in capsys.readouterr().out
    from safetensors.torch import load_file

    from maelab.engine.checkpoint import load_pretrained
    from maelab.models.weights import read_export_metadata

    mae = load_pretrained(run_dir).eval()
    meta = read_export_metadata(enc)
    vit = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"]).eval()
    vit.load_state_dict(load_file(str(enc)), strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x))
    # timm's own pretrained-file route, with a new classification head
    clf = timm.create_model(
        meta["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(enc)),
        **{**meta["timm_kwargs"], "num_classes": 7},
    )
    torch.testing.assert_close(clf.forward_features(x), mae.forward_features(x))


def test_visualize_own_images(run_dir, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(40, 30), (32, 32), (100, 64)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(imgs / f"{i}.png")
    Image.new("L", (50, 50), 128).save(imgs / "gray.jpg")
    out = tmp_path / "recon.png"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(run_dir),
                "--images",
                str(imgs),
                "--mask-ratio",
                "0.5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_encoder_only_checkpoints_are_refused_where_a_decoder_is_needed(run_dir, tmp_path, capsys):
    """A checkpoint without decoder weights (exported encoder, official mae_pretrain_*.pth layout, ViT directory)
    would reconstruct (visualize) or export (--format hf) with a random decoder: one line instead."""
    import maelab
    from maelab.models.hf import save_hf

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (32, 32), (40, 100, 200)).save(imgs / "a.png")
    enc = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--output", str(enc)]) == 0
    mae = maelab.create_model("mae_vit_pico_patch4_32")
    official = tmp_path / "mae_pretrain_vit_pico.pth"
    torch.save({"model": mae.encoder_state_dict()}, official)
    full = tmp_path / "mae_visualize_vit_pico.pth"
    torch.save({"model": mae.state_dict()}, full)
    vit_dir = save_hf(mae, tmp_path / "hf_vit", encoder_only=True)
    capsys.readouterr()
    for source in (enc, official, vit_dir):
        err = error_line(
            capsys,
            ["visualize", "--checkpoint", str(source), "--images", str(imgs), "--output", str(tmp_path / "r.png")],
        )
        assert "encoder-only" in err and str(source) in err
    # a full Hugging Face export of an encoder would ship a random decoder as ViTMAEForPreTraining
    assert "encoder-only" in error_line(
        capsys, ["export", "--checkpoint", str(enc), "--format", "hf", "--output", str(tmp_path / "hf_full")]
    )
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(enc),
                "--format",
                "hf",
                "--encoder-only",
                "--output",
                str(tmp_path / "hf_enc"),
            ]
        )
        == 0
    )
    assert (
        main(["visualize", "--checkpoint", str(full), "--images", str(imgs), "--output", str(tmp_path / "full.png")])
        == 0
    )


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in (
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
        "mae_vit_tiny_patch4_32",
        "mae_vit_tiny_patch2_32",
    ):
        assert name in out
    # name, kind, img, patch, encoder, MAE decoder (then the description, which has spaces)
    header, *lines = out.splitlines()
    assert header.split()[:7] == ["name", "kind", "img", "patch", "encoder", "MAE", "decoder"]
    rows = {cols[0]: cols for cols in (line.split() for line in lines)}
    swins = [name for name in rows if name.startswith("swin_")]
    assert len(swins) >= 5 and all(rows[name][1] == "swin" and rows[name][5] == "-" for name in swins)
    assert all(rows[name][1] == "vit" for name in rows if name.startswith("mae_vit_"))
    with torch.device("meta"):  # timm's Swin-T without its head: 27,519,354 parameters
        swin_t = sum(p.numel() for p in timm.create_model("swin_tiny_patch4_window7_224", num_classes=0).parameters())
    assert swin_t == 27_519_354 and rows["swin_tiny_patch4_window7_224"][4] == f"{swin_t / 1e6:.1f}M" == "27.5M"


def test_bench_on_cpu_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--json",
                str(path),
                "--data",
                "synthetic",
                "--num-workers",
                "0",
                *(f"{k}={v}" for k, v in TINY_MODEL_ARGS.items()),
            ]
        )
        == 0
    )
    report = json.loads(path.read_text())
    ours = report["results"][0]
    assert ours["name"] == "maelab" and ours["img_per_s"] > 0 and ours["peak_memory_gb"] > 0
    assert ours["flops_per_image"] > 0 and report["environment"]["torch"] == torch.__version__
    rows = {r["name"]: r for r in report["results"]}
    assert rows["data:loader"]["img_per_s"] > 0 and rows["data:end_to_end"]["img_per_s"] > 0
    assert rows["data:loader"]["gpu_resident"] is False  # CPU: the DataLoader path
    assert "img/s" in capsys.readouterr().out


def test_bad_inputs_are_one_clear_line(tmp_path, capsys):
    out = ["--output", str(tmp_path / "r"), "--no-progress", *FAST]
    assert "missing" in error_line(capsys, ["pretrain", "--data", str(tmp_path / "nope"), *out])
    assert "mae_vit_base_patch16" in error_line(capsys, ["pretrain", "--model", "vit_gigantic", *out])
    assert "mask_ratio" in error_line(capsys, ["pretrain", "--mask-ratio", "1.5", *out])
    assert "divisible" in error_line(capsys, ["pretrain", "model_args.img_size=30", *out])
    assert "epochs" in error_line(capsys, ["pretrain", "--epochs", "-1", *out[: -len(FAST)]])
    if not torch.cuda.is_available():
        assert "CUDA" in error_line(capsys, ["pretrain", "--device", "cuda", *out])
    (tmp_path / "bad.yaml").write_text("epochs: [\n")
    assert "bad.yaml" in error_line(capsys, ["pretrain", "--config", str(tmp_path / "bad.yaml"), *out])
    assert "not found" in error_line(capsys, ["export", "--checkpoint", str(tmp_path / "none.pt")])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "corrupt" in error_line(
        capsys, ["visualize", "--checkpoint", str(tmp_path / "junk.pt"), "--images", str(tmp_path)]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error_line(capsys, ["pretrain", "--data", str(empty), *out])


def test_strict_data_names_the_bad_file(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 5, 0, 0)).save(folder / f"{i:03d}.png")
    (folder / "000_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = [
        "pretrain",
        "--data",
        str(folder),
        "--output",
        str(tmp_path / "r"),
        "--no-progress",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        *TINY,
    ]
    assert "000_broken.jpg" in error_line(capsys, [*args, "--strict-data"])
    assert main([*args, "--output", str(tmp_path / "r2")]) == 0  # default: skipped with a warning


def test_pretrain_survives_a_dirty_folder(tmp_path, capsys, caplog):
    """Every kind of bad or odd file in one unlabeled tree: the run finishes, bad files are counted."""
    import numpy as np

    root = tmp_path / "dirty" / "nested"
    root.mkdir(parents=True)
    for i in range(24):
        Image.new("RGB", (40, 30), (i * 10, 50, 200)).save(root / f"ok_{i}.jpg")
    Image.new("CMYK", (33, 33), (10, 200, 30, 0)).save(root / "cmyk.jpg")
    Image.new("L", (20, 20), 99).save(root / "gray.png")
    Image.new("P", (20, 20), 3).save(root / "palette.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 100)).save(root / "rgba.png")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "deep16.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "one_pixel.png")
    Image.new("RGB", (4000, 3000), (0, 90, 0)).save(root / "large.jpg")
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((root / "ok_0.jpg").read_bytes()[:100])
    (root / "notes.png").write_text("not an image at all")
    args = [
        "pretrain",
        "--data",
        str(tmp_path / "dirty"),
        "--output",
        str(tmp_path / "r"),
        "--no-progress",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        *TINY,
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert "finished: epoch 2/2" in capsys.readouterr().out
    assert "truncated.jpg" in caplog.text or "zero.jpg" in caplog.text or "notes.png" in caplog.text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--compile"], {"compile": "on"}),
        (["--no-compile"], {"compile": "off"}),
        (["--compile", "--compile-mode", "reduce-overhead"], {"compile": "on", "compile_mode": "reduce-overhead"}),
        (["--fp8", "rowwise"], {"fp8": "rowwise"}),
        (["compile=off", "fp8=tensorwise"], {"compile": False, "fp8": "tensorwise"}),  # YAML: off is false
    ],
)
def test_speed_flags_become_config_overrides(argv, expected):
    from maelab.cli import build_parser, config_overrides

    args = build_parser().parse_args(["pretrain", *argv])
    got = config_overrides(args)
    assert {k: v for k, v in got.items() if k in ("compile", "compile_mode", "fp8")} == expected
