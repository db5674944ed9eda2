"""Unit tests of the evaluation building blocks (no training runs)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from tests.conftest import random_mae, save_mae

import maelab
from maelab.config import DataConfig, build_config
from maelab.engine.loop import start_run
from maelab.errors import CheckpointError, ConfigError
from maelab.eval.classifier import (
    build_classifier,
    frozen_to_eval,
    layer_decay_param_groups,
    set_trainable_blocks,
)
from maelab.eval.common import check_architecture
from maelab.eval.config import FinetuneConfig, KnnConfig, LinprobeConfig
from maelab.eval.features import extract_features, pool_tokens
from maelab.eval.knn import knn_accuracy, knn_predict
from maelab.eval.linprobe import LinearProbe, build_probe_optimizer, probe_param_groups
from maelab.models.registry import get_config

DEPTH = 3
TINY = {
    "embed_dim": 64,
    "depth": DEPTH,
    "num_heads": 1,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}


@pytest.fixture(scope="module")
def mae():
    return random_mae(**TINY).eval()


# ---------------------------------------------------------------------------------- configs
def test_config_defaults_are_the_papers():
    ft = FinetuneConfig(checkpoint="x")
    assert (ft.base_lr, ft.layer_decay, ft.weight_decay, ft.drop_path) == (1e-3, 0.75, 0.05, 0.1)
    assert (ft.mixup, ft.cutmix, ft.smoothing, ft.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert ft.auto_augment == "rand-m9-mstd0.5-inc1" and ft.betas == (0.9, 0.999) and ft.pool == "avg"
    assert (ft.epochs, ft.warmup_epochs) == (100, 5)
    lp = LinprobeConfig(checkpoint="x")
    assert (lp.optimizer, lp.base_lr, lp.weight_decay, lp.pool, lp.epochs, lp.warmup_epochs) == (
        "lars",
        0.1,
        0.0,
        "cls",
        90,
        10,
    )
    kn = KnnConfig(checkpoint="x")
    assert (kn.k, kn.temperature) == (20, 0.07)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (FinetuneConfig, {"checkpoint": "x", "pool": "max"}, "pool"),
        (FinetuneConfig, {"checkpoint": "x", "layer_decay": 1.5}, "layer_decay"),
        (FinetuneConfig, {"checkpoint": "x", "batch_size": 7}, "batch_size"),  # odd batch with mixup
        (FinetuneConfig, {}, "checkpoint"),
        (LinprobeConfig, {"checkpoint": "x", "optimizer": "adam"}, "optimizer"),
        (LinprobeConfig, {"checkpoint": "x", "train_blocks": -1}, "train_blocks"),
        (LinprobeConfig, {"checkpoint": "x", "crop": "timm"}, "crop"),
        (KnnConfig, {"checkpoint": "x", "temperature": 0}, "temperature"),
        (KnnConfig, {}, "checkpoint"),
    ],
)
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field) as e:
        cls(**kwargs)
    assert "\n" not in str(e.value)


def test_config_from_yaml_and_overrides(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("checkpoint: a.pt\ndata: {name: synthetic, num_classes: 4}\nbetas: [0.9, 0.99]\nauto_augment: none\n")
    cfg = build_config(FinetuneConfig, f, {"layer_decay": 0.65, "data.num_workers": 0})
    assert cfg.layer_decay == 0.65 and cfg.data.num_classes == 4 and cfg.data.num_workers == 0
    assert cfg.betas == (0.9, 0.99) and cfg.auto_augment is None
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(LinprobeConfig, None, {"checkpoint": "x", "layer_decay": 0.5})


def test_linprobe_cache_only_without_augmentation_and_tuning():
    assert LinprobeConfig(checkpoint="x", augment=False).uses_cache
    assert not LinprobeConfig(checkpoint="x", augment=True).uses_cache
    assert not LinprobeConfig(checkpoint="x", augment=False, train_blocks=1).uses_cache
    assert not LinprobeConfig(checkpoint="x", augment=False, cache_features=False).uses_cache


# ---------------------------------------------------------------------------------- classifier
def test_classifier_carries_the_encoder_weights(mae):
    clf = build_classifier(mae, 5, pool="cls", drop_path=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf.forward_features(x), mae.forward_features(x))
    assert clf.head.weight.shape == (5, 64)
    assert clf.head.weight.std().item() < 1e-4 and torch.all(clf.head.bias == 0)  # trunc_normal(std=2e-5)


def test_avg_pool_classifier_drops_norm_and_adds_fc_norm(mae):
    clf = build_classifier(mae, 3, pool="avg").eval()
    assert isinstance(clf.norm, torch.nn.Identity) and isinstance(clf.fc_norm, torch.nn.LayerNorm)
    enc = mae.encoder_state_dict()
    for k, v in clf.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")):
            assert torch.equal(v, enc[k]), k
    assert torch.equal(clf.fc_norm.weight, torch.ones(64)) and torch.equal(clf.fc_norm.bias, torch.zeros(64))


def test_classifier_resamples_position_embedding_for_another_resolution(mae):
    clf = build_classifier(mae, 3, img_size=48)
    assert clf.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert clf(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_mismatched_weights_are_one_line_checkpoint_errors(mae):
    other = maelab.create_model("mae_vit_pico_patch4_32", **{**TINY, "embed_dim": 32, "num_heads": 1})
    clf = build_classifier(None, 3, model_cfg=other.cfg)
    from maelab.eval.classifier import load_encoder_weights

    with pytest.raises(CheckpointError, match="do not fit") as e:
        load_encoder_weights(clf, mae.encoder_state_dict(), source="ckpt.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not match model='mae_vit_tiny_patch4_32'") as e:
        check_architecture(mae.cfg, get_config("mae_vit_tiny_patch4_32"), "ckpt.pt", "mae_vit_tiny_patch4_32")
    assert "embed_dim=64" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- layer decay, weight decay
@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_layer_decay_gives_each_block_its_scale(mae, pool):
    """The official util/lr_decay.py: block i of L -> decay ** (L - i), stem -> decay ** (L + 1), and every
    other parameter (the final norm with pool=cls, fc_norm with pool=avg, the head) -> 1.0."""
    clf = build_classifier(mae, 4, pool=pool)
    decay = 0.75
    groups = layer_decay_param_groups(clf, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    seen = 0
    for name, p in clf.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            expected = decay ** (DEPTH - i)
        elif name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            expected = decay ** (DEPTH + 1)
        else:
            assert name.startswith(("norm.", "fc_norm.", "head.")), name
            expected = 1.0
        assert math.isclose(scale_of[id(p)], expected, rel_tol=1e-12), name
        seen += 1
    assert seen == len(scale_of)
    final_norm = "norm.weight" if pool == "cls" else "fc_norm.weight"
    assert scale_of[id(dict(clf.named_parameters())[final_norm])] == 1.0


def test_no_weight_decay_on_norms_biases_and_tokens(mae):
    clf = build_classifier(mae, 4, pool="avg")
    groups = layer_decay_param_groups(clf, weight_decay=0.05, layer_decay=0.75)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in clf.named_parameters():
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert wd_of[id(p)] == (0.0 if no_decay else 0.05), name
    names = {n for n, p in clf.named_parameters() if wd_of[id(p)] == 0.0}
    assert {"cls_token", "pos_embed", "fc_norm.weight", "blocks.0.norm1.weight", "head.bias"} <= names
    assert "head.weight" not in names and "blocks.0.attn.qkv.weight" not in names


def test_seed_rank_gives_each_rank_its_own_drop_path_masks():
    """Official main_finetune.py seeds ``seed + rank``: two ranks (same seed, same epoch) draw different drop-path
    masks; the same (seed, rank, epoch) draws the same ones, another epoch other ones."""
    import timm

    from maelab.eval.finetune import seed_rank

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=4, num_classes=3, drop_path_rate=0.5
    ).train()
    x = torch.randn(4, 3, 16, 16)

    def out(rank: int, epoch: int = 0) -> torch.Tensor:
        seed_rank(7, rank, epoch)
        return vit(x)

    rank0 = out(0)
    assert torch.equal(out(0), rank0)
    assert not torch.allclose(out(1), rank0, atol=1e-4)
    assert not torch.allclose(out(0, epoch=1), rank0, atol=1e-4)


def test_finetune_seeds_each_epoch_by_rank(tmp_path, monkeypatch):
    """The training loop reseeds every epoch with (seed, this process's rank, epoch), here as rank 1 of a run
    whose collectives are stubbed (world_size 1)."""
    from maelab.engine.distributed import DistInfo

    ft = importlib.import_module("maelab.eval.finetune")
    loop = importlib.import_module("maelab.engine.loop")
    calls = []
    monkeypatch.setattr(ft, "seed_rank", lambda *args: calls.append(args))
    monkeypatch.setattr(
        loop, "setup_process", lambda device, precision: (DistInfo(rank=1), torch.device("cpu"), torch.float32)
    )
    data = DataConfig(name="synthetic", num_samples=32, num_classes=2, num_workers=0, crop_pct=1.0)
    cfg = FinetuneConfig(
        from_scratch=True,
        model="mae_vit_pico_patch4_32",
        model_args={"depth": 1},
        data=data,
        batch_size=16,
        epochs=2,
        warmup_epochs=0,
        eval_every=2,
        auto_augment=None,
        reprob=0.0,
        seed=3,
        output=str(tmp_path / "ft"),
    )
    ft.finetune(cfg, progress=False)
    assert calls == [(3, 1, 0), (3, 1, 1)]


def test_probe_optimizer_groups_follow_the_official_lars():
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 3))
    groups = probe_param_groups(head, 0.1, lars=True)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert groups[0]["params"][0].ndim == 2 and groups[0]["always_adapt"] and groups[0]["weight_decay"] == 0.1
    assert groups[1]["params"][0].ndim == 1 and not groups[1]["always_adapt"] and groups[1]["weight_decay"] == 0.0
    from timm.optim import Lars

    opt = build_probe_optimizer(head, LinprobeConfig(checkpoint="x"), lr=0.1)
    assert isinstance(opt, Lars) and opt.param_groups[0]["trust_coeff"] == 0.001


# ---------------------------------------------------------------------------------- partial fine-tuning
@pytest.mark.parametrize("k", [0, 1, DEPTH])
def test_train_blocks_selects_exactly_the_last_blocks(mae, k):
    clf = build_classifier(mae, 4, pool="avg")
    trainable = set(set_trainable_blocks(clf, k))
    assert trainable == {n for n, p in clf.named_parameters() if p.requires_grad}
    for name in (n for n, _ in clf.named_parameters()):
        if name.startswith(("head.", "fc_norm.")):
            assert name in trainable
        elif name.startswith("blocks."):
            assert (name in trainable) == (int(name.split(".")[1]) >= DEPTH - k), name
        else:  # patch_embed, cls_token, pos_embed
            assert name not in trainable, name
    clf.train()
    frozen_to_eval(clf, k)
    assert [b.training for b in clf.blocks] == [i >= DEPTH - k for i in range(DEPTH)]
    assert clf.head.training and not clf.patch_embed.training


def test_too_many_train_blocks_is_a_config_error(mae):
    clf = build_classifier(mae, 4)
    with pytest.raises(ConfigError, match="only 3 blocks"):
        set_trainable_blocks(clf, 4)


def test_linear_probe_tunes_only_its_head_and_the_last_blocks(mae):
    import copy

    probe = LinearProbe(copy.deepcopy(mae.encoder), 4, "cls", train_blocks=0)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine
    probe.train()
    assert not probe.encoder.training and probe.head.training
    probe = LinearProbe(copy.deepcopy(mae.encoder), 4, "cls", train_blocks=1)
    tuned = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert tuned == {"head.1.weight", "head.1.bias", "encoder.norm.weight", "encoder.norm.bias"} | {
        n for n, _ in probe.named_parameters() if n.startswith(f"encoder.blocks.{DEPTH - 1}.")
    }


# ---------------------------------------------------------------------------------- features, kNN
def test_pool_tokens():
    t = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    assert torch.equal(pool_tokens(t, "cls"), t[:, 0])
    assert torch.allclose(pool_tokens(t, "avg"), t[:, 1:].mean(1))


def test_extract_features_is_eval_mode_and_restores_it(mae):
    ds = torch.utils.data.TensorDataset(torch.randn(5, 3, 32, 32), torch.arange(5))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    mae.encoder.train()
    f, y = extract_features(mae.encoder, loader, "cls", "cpu")
    assert mae.encoder.training
    assert f.shape == (5, 64) and torch.equal(y, torch.arange(5))
    mae.encoder.eval()
    with torch.no_grad():
        assert torch.allclose(f, mae.forward_features(ds.tensors[0])[:, 0], atol=1e-6)


def test_knn_weighted_votes_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    test = torch.randn(7, 8, generator=g)
    scores = knn_predict(train, labels, test, 3, k=5, temperature=0.1, chunk=3)
    tn, qn = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    for i in range(7):
        sim = tn @ qn[i]
        top = sim.topk(5)
        expected = torch.zeros(3)
        for s, j in zip(top.values, top.indices):
            expected[labels[j]] += math.exp(s.item() / 0.1)
        assert torch.allclose(scores[i], expected, rtol=1e-5)
    assert torch.allclose(scores, knn_predict(train, labels, test, 3, k=5, temperature=0.1, chunk=1000))


def test_knn_recovers_clustered_classes():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 16, generator=g) * 3
    y_train, y_test = torch.arange(300) % 6, torch.arange(60) % 6
    train = centers[y_train] + torch.randn(300, 16, generator=g)
    test = centers[y_test] + torch.randn(60, 16, generator=g)
    acc = knn_accuracy(train, y_train, test, y_test, 6)
    assert acc["top1"] > 90 and acc["top5"] >= acc["top1"]
    assert "top5" not in knn_accuracy(train, y_train % 4, test, y_test % 4, 4)  # top-5 of 4 classes is trivial


def test_default_data_config_is_accepted():
    cfg = FinetuneConfig(from_scratch=True, data=DataConfig(num_classes=3))
    assert cfg.checkpoint is None and cfg.data.num_classes == 3


def test_recipes_are_valid_configs(monkeypatch):
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    kinds = {"finetune": FinetuneConfig, "linprobe": LinprobeConfig, "knn": KnnConfig}
    found = 0
    for path in sorted(recipes.glob("*.yaml")):
        prefix = path.name.split("_")[0]
        if prefix in kinds:
            cfg = build_config(kinds[prefix], path)
            assert cfg.output.startswith("runs/"), path.name
            found += 1
    assert found >= 8
    paper = build_config(FinetuneConfig, recipes / "finetune_imagenet_vit_base_paper.yaml")
    assert paper.effective_batch() == 1024 and paper.resolved_lr() == pytest.approx(4e-3)
    official = build_config(FinetuneConfig, recipes / "finetune_imagenet_vit_base_official.yaml")  # FINETUNE.md
    assert (official.base_lr, official.layer_decay, official.drop_path) == (5e-4, 0.65, 0.1)
    for size, model, drop_path in (("large", "mae_vit_large_patch16", 0.2), ("huge", "mae_vit_huge_patch14", 0.3)):
        big = build_config(FinetuneConfig, recipes / f"finetune_imagenet_vit_{size}.yaml")
        assert (big.model, big.epochs, big.base_lr, big.layer_decay, big.drop_path) == (
            model,
            50,
            1e-3,
            0.75,
            drop_path,
        )
        get_config(big.model)
    # global_batch 1024 at any GPU count, FINETUNE.md's per-GPU batch as the cap: (batch, accum) per world size
    splits = {
        "base_official": {1: (32, 32), 8: (32, 4)},
        "large": {1: (32, 32), 8: (32, 4)},
        "huge": {1: (16, 64), 8: (16, 8)},
    }
    for name, by_world in splits.items():
        for world, split in by_world.items():
            monkeypatch.setenv("WORLD_SIZE", str(world))
            cfg = build_config(FinetuneConfig, recipes / f"finetune_imagenet_vit_{name}.yaml")
            assert (cfg.global_batch, (cfg.batch_size, cfg.accum_steps), cfg.effective_batch(world)) == (
                1024,
                split,
                1024,
            ), (name, world)
            assert cfg.resolved_lr(world) == pytest.approx(cfg.base_lr * 4), (name, world)
    monkeypatch.delenv("WORLD_SIZE")
    probe = build_config(LinprobeConfig, recipes / "linprobe_imagenet_vit_base_paper.yaml")
    assert probe.resolved_lr() == pytest.approx(6.4) and probe.pool == "cls" and probe.optimizer == "lars"


@pytest.mark.parametrize("crop", [None, "torchvision"])
def test_linear_probe_augments_with_the_official_crop_by_default(mae, tmp_path, monkeypatch, crop):
    """The probe's training crop: the official single clipped draw (util/crop.py) unless crop=torchvision."""
    from maelab.data.transforms import ClippedRandomResizedCrop

    linprobe = importlib.import_module("maelab.eval.linprobe")  # (maelab.eval.linprobe is also a function)
    ckpt = save_mae(mae, tmp_path / "m.pt")
    made, original = [], linprobe.pretrain_transform

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(linprobe, "pretrain_transform", spy)
    data = DataConfig(name="synthetic", num_samples=32, num_classes=2, num_workers=0)
    cfg = LinprobeConfig(
        checkpoint=str(ckpt),
        data=data,
        batch_size=8,
        output=str(tmp_path / "p"),
        device="cpu",
        **({"crop": crop} if crop else {}),
    )
    linprobe.LinearProbing(start_run(cfg, "linprobe", overwrite=True, progress=False))
    crops = [t for t in made[0].transforms if isinstance(t, torch.nn.Module) and "ResizedCrop" in type(t).__name__]
    assert len(crops) == 1
    assert isinstance(crops[0], ClippedRandomResizedCrop) == (crop is None)


def test_streaming_probe_copies_images_and_labels_without_blocking(mae, tmp_path, monkeypatch):
    """Streamed batches (the training step's loss and the evaluation) go to the device with
    ``non_blocking=True``, from the pinned memory the loader gives (no host sync per step)."""
    from maelab.eval.linprobe import LinearProbing

    data = DataConfig(name="synthetic", num_samples=16, num_classes=2, num_workers=0, crop_pct=1.0)
    cfg = LinprobeConfig(
        checkpoint=str(save_mae(mae, tmp_path / "m.pt")),
        data=data,
        batch_size=8,
        train_blocks=1,  # streamed images through the whole probe (train and test)
        output=str(tmp_path / "p"),
        device="cpu",
    )
    probe = LinearProbing(start_run(cfg, "linprobe", overwrite=True, progress=False))
    assert probe.end_to_end and probe.val_cache is None

    calls: list[dict] = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved = original(self, *args, **kwargs)
        if self.data_ptr() not in inputs:
            return moved
        calls.append(kwargs)  # a copy of the loader's images or labels
        return moved.clone()  # a new tensor, as a copy to the GPU makes (later moves of it are not counted)

    batch = (torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))
    inputs = {t.data_ptr() for t in batch}
    monkeypatch.setattr(torch.Tensor, "to", spy)
    probe._loss(probe.model, batch)
    probe.val_loader = [batch]  # type: ignore[assignment]
    probe.evaluate(1, final=True)
    assert len(calls) == 4 and all(c.get("non_blocking") for c in calls), calls
