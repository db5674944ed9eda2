"""Every registered method through the shared loop: its loss falls, it resumes bit-exactly mid-epoch, and its
encoder exports into timm and evaluates with kNN."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from maelab.cli import main
from maelab.config import PretrainConfig, build_config
from maelab.engine.pretrain import pretrain

# BEiT needs a tokenizer: tests/methods/test_beit.py. The default suite runs SimMIM (the masked encoder MaskFeat and
# BEiT share); MAE's run is in tests/engine, AE/VAE's model tests in tests/methods/test_autoencoder.py; -m slow all.
# (method, model, kNN pooling): a Swin has no class token, so its kNN pools by average.
VIT = "mae_vit_pico_patch4_32"
METHODS = [
    pytest.param("mae", VIT, "cls", id="mae", marks=pytest.mark.slow),
    pytest.param("simmim", VIT, "cls", id="simmim"),
    pytest.param("maskfeat", VIT, "cls", id="maskfeat", marks=pytest.mark.slow),
    pytest.param("ae", VIT, "cls", id="ae", marks=pytest.mark.slow),
    pytest.param("vae", VIT, "cls", id="vae", marks=pytest.mark.slow),  # tests/methods/test_autoencoder.py
    # 17 s on CPU; default: tests/eval/test_swin_eval.py (a Swin run through the loop, its timm export, the average
    # pooling kNN uses) and the simmim case above (SimMIM's learning and exact resume through the same loop)
    pytest.param("simmim", "swin_pico_patch2_window4_32", "avg", id="simmim-swin", marks=pytest.mark.slow),
]


def tiny(output, method: str, model: str = VIT, **kw):
    overrides = {
        "model": model,
        "method": method,
        "output": str(output),
        "epochs": 3,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_epochs": 0,
        "data.num_samples": 32,
        "data.num_workers": 0,
        "device": "cpu",
        "vis_every": 3,
        **kw,
    }
    return build_config(PretrainConfig, None, overrides)


@pytest.mark.parametrize(("method", "model", "pool"), METHODS)
def test_method_learns_resumes_exactly_exports_to_timm_and_evaluates_with_knn(method, model, pool, tmp_path):
    full = pretrain(tiny(tmp_path / "full", method, model), progress=False)
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]

    part = tiny(tmp_path / "part", method, model)
    assert pretrain(part, progress=False, max_steps=3).stopped_early  # mid-epoch 2 (2 steps per epoch)
    resumed = pretrain(part, progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)
    assert a["method"] == b["method"] == method
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert resumed.final_loss == full.final_loss

    exported = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "full"), "--output", str(exported)]) == 0
    meta = json.loads(__import__("safetensors").safe_open(str(exported), "pt").metadata()["maelab_timm_kwargs"])
    vit = timm.create_model(a["model_config"]["timm_name"], pretrained=False, **meta)
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(str(exported)), strict=True)  # every encoder weight, no extra key
    assert (
        main(
            [
                "knn",
                "--checkpoint",
                str(tmp_path / "full"),
                "--output",
                str(tmp_path / "knn"),
                "--no-progress",
                "--pool",
                pool,
                "data.num_samples=32",
                "data.num_workers=0",
                "device=cpu",
                "batch_size=16",
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "knn" / "eval.json").read_text())
    assert 0.0 <= ev["metrics"]["top1"] <= 100.0
