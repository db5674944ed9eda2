"""A pre-trained Swin (SimMIM) in the evaluations and the export: the classifier carries its weights, partial
fine-tuning tunes the last blocks across stages, layer decay rises from the patch embedding to the head, features
pool by average only, and the export loads strictly into timm (the Hugging Face export refuses it in one line)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
from tests.conftest import error_line

from maelab.cli import main
from maelab.config import PretrainConfig, build_config
from maelab.engine.checkpoint import load_pretrained
from maelab.engine.pretrain import pretrain
from maelab.errors import ConfigError
from maelab.eval.classifier import (
    block_prefixes,
    build_classifier,
    frozen_to_eval,
    layer_decay_param_groups,
    set_trainable_blocks,
)
from maelab.eval.features import extract_features, pool_tokens
from maelab.methods.vit import PretrainedEncoder
from maelab.models.weights import load_exported_encoder

PICO = "swin_pico_patch2_window4_32"
"""3 stages of 2 blocks (dims 32-64-128), a patch merging before stages 1 and 2, 32 px images."""
BLOCKS = [f"layers.{s}.blocks.{j}." for s in range(3) for j in range(2)]
"""The pico Swin's 6 blocks in forward order."""


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SimMIM run on the pico Swin, one optimizer step through the real pre-training loop."""
    out = tmp_path_factory.mktemp("swin") / "run"
    overrides = {
        "model": PICO,
        "method": "simmim",
        "output": str(out),
        "epochs": 1,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup_epochs": 0,
        "data.num_samples": 16,
        "data.num_workers": 0,
        "device": "cpu",
        "vis_every": 1000,
    }
    assert pretrain(build_config(PretrainConfig, None, overrides), progress=False, max_steps=1).stopped_early
    return out


@pytest.fixture(scope="module")
def swin(swin_run: Path) -> PretrainedEncoder:
    encoder = load_pretrained(swin_run)
    assert isinstance(encoder, PretrainedEncoder) and encoder.cfg.encoder == "swin"
    return encoder.eval()


def checkpoint_encoder(run: Path) -> dict[str, torch.Tensor]:
    """The encoder weights the run saved, under timm's names (read directly from ``last.pt``)."""
    raw = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    return {k.removeprefix("encoder."): v for k, v in raw["model"].items() if k.startswith("encoder.")}


# ---------------------------------------------------------------------------------- classifier
def test_classifier_carries_the_pretrained_swin_weights(swin_run: Path, swin: PretrainedEncoder) -> None:
    saved = checkpoint_encoder(swin_run)
    clf = build_classifier(swin, 5, pool="avg").eval()
    own = clf.state_dict()
    assert {k for k in own if not k.startswith("head.")} == set(saved)
    for key, value in saved.items():
        assert torch.equal(own[key], value), key
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf.forward_features(imgs), swin.forward_features(imgs))
    head = clf.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (5, 128)
    assert 0.01 < head.weight.std().item() < 0.03 and torch.all(head.bias == 0)  # timm's trunc_normal(std=.02)


def expected_tuned(k: int) -> tuple[str, ...]:
    """Parameter-name prefixes partial fine-tuning of the last ``k`` pico blocks tunes (written out by hand)."""
    return {
        0: ("head.",),
        1: ("layers.2.blocks.1.", "norm.", "head."),
        # the merging before stage 2 sits between two tuned blocks (layers.1.blocks.1, layers.2.blocks.0)
        3: ("layers.1.blocks.1.", "layers.2.downsample.", "layers.2.blocks.", "norm.", "head."),
        # the merging before stage 1 comes before the first tuned block: frozen, like a ViT's patch embedding
        4: ("layers.1.blocks.", "layers.2.downsample.", "layers.2.blocks.", "norm.", "head."),
        6: ("layers.", "norm.", "head."),
    }[k]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 6])
def test_partial_finetuning_tunes_the_last_blocks_across_stages(swin: PretrainedEncoder, k: int) -> None:
    clf = build_classifier(swin, 4, pool="avg")
    assert block_prefixes(clf) == BLOCKS
    trainable = set(set_trainable_blocks(clf, k))
    assert trainable == {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in clf.named_parameters() if n.startswith(expected_tuned(k))}

    clf.train()
    frozen_to_eval(clf, k)
    modes = {
        name: module.training
        for name, module in clf.named_modules()
        if name + "." in BLOCKS or name in ("layers.1.downsample", "layers.2.downsample", "patch_embed", "norm", "head")
    }
    assert len(modes) == 6 + 2 + 3  # every block, the two patch mergings (stage 0's downsample is an Identity), ...
    assert modes == {name: (name + ".").startswith(expected_tuned(k)) for name in modes}


def test_too_many_train_blocks_for_a_swin_is_a_config_error(swin: PretrainedEncoder) -> None:
    clf = build_classifier(swin, 4)
    with pytest.raises(ConfigError, match="invalid train_blocks=7: ") as e:
        set_trainable_blocks(clf, 7)
    assert " 6 blocks" in str(e.value) and "\n" not in str(e.value)


def test_layer_decay_rises_from_the_patch_embedding_through_the_stages_to_the_head(swin: PretrainedEncoder) -> None:
    """timm's Swin grouping: patch embedding 0, block i (across stages) i + 1, a stage's merging with its first
    block, the final norm with the last block, the head last at 1.0."""
    clf = build_classifier(swin, 4, pool="avg")
    decay = 0.75
    groups = layer_decay_param_groups(clf, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    head_layer = len(BLOCKS) + 1

    def layer(name: str) -> int:
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("layers.") and ".downsample." in name:
            return BLOCKS.index(f"layers.{name.split('.')[1]}.blocks.0.") + 1
        if name.startswith("norm."):
            return len(BLOCKS)
        if name.startswith("head."):
            return head_layer
        return next(i for i, prefix in enumerate(BLOCKS) if name.startswith(prefix)) + 1

    params = dict(clf.named_parameters())
    assert len(scale_of) == len(params)
    per_layer: dict[int, set[float]] = {}
    for name, p in params.items():
        assert math.isclose(scale_of[id(p)], decay ** (head_layer - layer(name)), rel_tol=1e-12), name
        per_layer.setdefault(layer(name), set()).add(scale_of[id(p)])
    scales = [per_layer[i].pop() for i in range(head_layer + 1)]  # one scale per layer (the isclose above)
    assert all(a < b for a, b in zip(scales, scales[1:])), scales
    assert scales[-1] == 1.0


def test_no_weight_decay_on_norms_biases_and_relative_position_tables(swin: PretrainedEncoder) -> None:
    clf = build_classifier(swin, 4, pool="avg")
    groups = layer_decay_param_groups(clf, weight_decay=0.05, layer_decay=0.75)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in clf.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith("relative_position_bias_table")
        assert wd_of[id(p)] == (0.0 if no_decay else 0.05), name


# ---------------------------------------------------------------------------------- features, pooling
def test_features_average_the_swin_map(swin: PretrainedEncoder) -> None:
    fmap = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(pool_tokens(fmap, "avg"), fmap.mean(dim=(1, 2)))
    imgs = torch.randn(5, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, torch.arange(5)), batch_size=2)
    features, labels = extract_features(swin.encoder, loader, "avg", "cpu")
    with torch.no_grad():
        expected = swin.forward_features(imgs).mean(dim=(1, 2))  # [5, 4, 4, 128] -> [5, 128]
    assert features.shape == (5, 128) and torch.equal(labels, torch.arange(5))
    torch.testing.assert_close(features, expected)


def test_pool_cls_on_a_swin_is_a_one_line_config_error(swin: PretrainedEncoder) -> None:
    for call in (lambda: pool_tokens(torch.randn(2, 4, 4, 8), "cls"), lambda: build_classifier(swin, 4, pool="cls")):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value).startswith("invalid pool='cls': a Swin encoder has no class token")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune"])
def test_pool_cls_for_a_swin_checkpoint_is_one_line_in_every_evaluation(
    swin_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    epochs = [] if command == "knn" else ["--epochs", "1", "warmup_epochs=0"]
    argv = [command, "--checkpoint", str(swin_run), "--pool", "cls", "--data", "synthetic", "data.num_samples=16"]
    runnable = [*epochs, "--batch-size", "8", "--num-workers", "0", "--no-progress", "device=cpu"]  # but for pool
    err = error_line(capsys, [*argv, *runnable, "--output", str(tmp_path / "out")])
    assert err == "maelab: error: invalid pool='cls': a Swin encoder has no class token; use pool=avg (--pool avg)"


# ---------------------------------------------------------------------------------- export
def test_export_loads_strictly_into_timm_with_the_runs_features(
    swin_run: Path, swin: PretrainedEncoder, tmp_path: Path
) -> None:
    exported = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(swin_run), "--output", str(exported)]) == 0
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(exported), "pt") as f:
        meta: dict[str, Any] = json.loads(f.metadata()["maelab_timm_kwargs"])
    direct = timm.create_model(swin.cfg.timm_name, pretrained=False, **meta)
    direct.load_state_dict(load_file(str(exported)), strict=True)  # every encoder weight, no extra key
    reloaded = load_pretrained(exported)  # the exported file as an evaluation's --checkpoint
    assert isinstance(reloaded, PretrainedEncoder)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = swin.forward_features(imgs)
        assert expected.shape == (2, 4, 4, 128)
        for model in (direct, load_exported_encoder(exported), reloaded):
            features = cast(Any, model.eval()).forward_features(imgs)
            assert torch.equal(features, expected), type(model).__name__


@pytest.mark.parametrize("encoder_only", [False, True], ids=["full", "encoder-only"])
def test_hugging_face_export_of_a_swin_is_one_line(
    swin_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder_only: bool
) -> None:
    flags = ["--encoder-only"] if encoder_only else []
    out = tmp_path / "hf"
    err = error_line(capsys, ["export", "--checkpoint", str(swin_run), "--format", "hf", *flags, "--output", str(out)])
    assert err == (
        f"maelab: error: {swin_run}: a swin encoder, and the Hugging Face export writes ViTs (ViTMAE, ViTModel): "
        "export it for timm instead (no --format)"
    )
    assert not out.exists()
