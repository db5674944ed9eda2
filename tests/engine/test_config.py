import pytest

from maelab.config import PretrainConfig, build_config, parse_override, save_yaml
from maelab.errors import ConfigError


@pytest.mark.parametrize("override, field", [
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"model_args.mask_ratio": 1.0}, "mask_ratio"),
    ({"model_args.mask_ratio": -0.1}, "mask_ratio"),
    ({"model_args.img_size": 30}, "img_size"),
    ({"model_args.mask_type": "diagonal"}, "mask_type"),
    ({"model_args.bogus": 1}, "model_args"),
    ({"warmup_epochs": 50}, "warmup_epochs"),
    ({"precision": "fp8"}, "precision"),
    ({"data.num_workers": -2}, "data.num_workers"),
    ({"data.min_scale": 0}, "data.min_scale"),
    ({"epochs": "ten"}, "epochs"),
    ({"unknown_key": 3}, "unknown_key"),
    ({"betas": [0.9, 1.5]}, "betas"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        cfg = build_config(PretrainConfig, None, override)
        from maelab.models.registry import get_config

        get_config(cfg.model, **cfg.model_args)  # model-level checks happen here


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = build_config(PretrainConfig, None, {"epochs": 3, "data.name": "synthetic", "model_args.norm_pix_loss": True,
                                              "betas": [0.9, 0.99]})
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    again = build_config(PretrainConfig, path)
    assert again == cfg
    assert build_config(PretrainConfig, path, {"epochs": 5}).epochs == 5


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(PretrainConfig, bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(PretrainConfig, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        build_config(PretrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "e.yaml").write_text("epochs: -3\n")
    with pytest.raises(ConfigError, match=r"e\.yaml.*epochs"):
        build_config(PretrainConfig, tmp_path / "e.yaml")


def test_parse_override():
    assert parse_override("data.num_workers=4") == ("data.num_workers", 4)
    assert parse_override("model_args.norm_pix_loss=true") == ("model_args.norm_pix_loss", True)
    assert parse_override("output=runs/x") == ("output", "runs/x")
    with pytest.raises(ConfigError):
        parse_override("epochs")


def test_recipes_are_valid():
    from pathlib import Path

    from maelab.models.registry import get_config

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    pretrain = [r for r in recipes if not r.name.startswith(("finetune", "linprobe", "knn"))]
    assert {r.stem for r in pretrain} >= {"synthetic_tiny", "cifar10_vit_tiny", "imagenet_vit_base_paper"}
    for r in pretrain:
        cfg = build_config(PretrainConfig, r)
        get_config(cfg.model, **cfg.model_args)
    paper = build_config(PretrainConfig, Path(recipes[0]).parent / "imagenet_vit_base_paper.yaml")
    assert paper.effective_batch(world_size=8) == 4096 and paper.resolved_lr(world_size=8) == pytest.approx(2.4e-3)
    assert paper.epochs == 800 and paper.warmup_epochs == 40 and paper.model_args["norm_pix_loss"] is True
