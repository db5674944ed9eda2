"""One config engine: the run fields on shared bases, one name per setting, and the renamed keys' migration."""

import logging
from dataclasses import fields

import pytest
import yaml

from maelab.config import (
    RENAMED_KEYS,
    DataConfig,
    PretrainConfig,
    RunConfig,
    TrainConfig,
    build_config,
    field_docs,
    from_dict,
    save_yaml,
    to_dict,
)
from maelab.errors import ConfigError
from maelab.eval.config import EmbedConfig, EncoderConfig, FeatureConfig, FinetuneConfig, KnnConfig, LinprobeConfig

TRAINING = [PretrainConfig, FinetuneConfig, LinprobeConfig]
PROTOCOLS = [*TRAINING, KnnConfig, EmbedConfig]
REQUIRED = {
    PretrainConfig: {},
    FinetuneConfig: {"checkpoint": "ckpt.pt"},
    LinprobeConfig: {"checkpoint": "ckpt.pt"},
    KnnConfig: {"checkpoint": "ckpt.pt"},
    EmbedConfig: {"checkpoint": "ckpt.pt", "output": "features.npy"},
}
# what the training loop reads, as the issue lists it
LOOP_FIELDS = {
    "epochs", "batch_size", "accum_steps", "global_batch", "base_lr", "lr", "min_lr", "weight_decay", "warmup_epochs",
    "grad_clip", "max_bad_steps", "log_every", "save_every", "save_every_steps", "keep_last", "tensorboard",
    "device", "precision", "seed", "output", "data", "model", "model_args",
}  # fmt: skip
MESSAGE = "config key crop_min_scale is now data.min_scale: read crop_min_scale=0.3 as data.min_scale; rename it"


def names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def own_annotations(cls: type) -> dict[str, str]:
    return cls.__dict__.get("__annotations__", {})


def test_the_run_fields_are_declared_once_on_the_bases():
    """Every protocol has RunConfig's fields, every training protocol TrainConfig's (all the loop reads);
    a subclass that re-declares one of them only changes its default: same type, possibly without None."""
    assert LOOP_FIELDS <= names(TrainConfig)
    for cls in PROTOCOLS:
        assert names(RunConfig) <= names(cls), cls.__name__
    for cls in TRAINING:
        assert issubclass(cls, TrainConfig) and names(TrainConfig) <= names(cls), cls.__name__
    assert issubclass(KnnConfig, FeatureConfig) and issubclass(EmbedConfig, FeatureConfig)
    assert not issubclass(FeatureConfig, TrainConfig)
    for cls in PROTOCOLS:
        for klass in cls.__mro__:
            for name, annotation in own_annotations(klass).items():
                for base in klass.__mro__[1:]:
                    declared = own_annotations(base).get(name)
                    if declared is not None:
                        assert annotation in (declared, declared.removesuffix(" | None")), (klass, name, base)
    for cls in TRAINING:
        for method in ("effective_batch", "resolved_lr"):
            assert [k for k in cls.__mro__ if method in vars(k)] == [TrainConfig], (cls.__name__, method)


def test_a_setting_has_one_name_in_every_protocol():
    """A field name shared by two protocols has one type (the same setting; null may be allowed in one only);
    no protocol keeps an old name."""
    seen: dict[str, tuple[str, type]] = {}
    for cls in PROTOCOLS:
        for f in fields(cls):
            plain = str(f.type).removesuffix(" | None")
            assert seen.setdefault(f.name, (plain, cls))[0] == plain, (f.name, cls.__name__, seen[f.name][1].__name__)
        assert not set(RENAMED_KEYS) & names(cls)
    assert "crop_min_scale" not in seen and "min_scale" in names(DataConfig)


def test_protocol_defaults_of_the_crop_scale_hold_for_partial_data_sections():
    """data.min_scale: pre-training 0.2 (paper), fine-tuning and linear probing 0.08, also when a recipe's data
    section or a key=value names other data keys only."""
    assert PretrainConfig().data.min_scale == 0.2
    for cls in (FinetuneConfig, LinprobeConfig):
        assert cls(**REQUIRED[cls]).data.min_scale == 0.08
        assert cls(**REQUIRED[cls], data={"name": "cifar10"}).data.min_scale == 0.08
        assert build_config(cls, None, {**REQUIRED[cls], "data": {"num_classes": 3}}).data.min_scale == 0.08
        cfg = build_config(cls, None, {**REQUIRED[cls], "data.name": "cifar10", "data.min_scale": 0.5})
        assert (cfg.data.name, cfg.data.min_scale) == ("cifar10", 0.5)


@pytest.mark.parametrize("cls", [FinetuneConfig, LinprobeConfig, PretrainConfig])
def test_an_old_recipe_with_crop_min_scale_loads_as_data_min_scale_with_one_warning(cls, tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({**REQUIRED[cls], "data": {"name": "synthetic"}, "crop_min_scale": 0.3}))
    with caplog.at_level(logging.WARNING):
        cfg = build_config(cls, recipe)
    assert cfg.data.min_scale == 0.3 and cfg.data.name == "synthetic"
    assert [r.getMessage() for r in caplog.records] == [MESSAGE]
    save_yaml(cfg, tmp_path / "config.yaml")  # written under the new name: reloads silently
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert build_config(cls, tmp_path / "config.yaml") == cfg
    assert not caplog.records and "crop_min_scale" not in (tmp_path / "config.yaml").read_text()


def test_crop_min_scale_as_key_value_and_in_a_saved_config(caplog):
    """key=value with the old key, and a config saved before the rename (a run's config.yaml, a checkpoint's
    "config"), which holds both keys: the old one is what evaluation used, so it wins."""
    with caplog.at_level(logging.WARNING):
        cfg = build_config(FinetuneConfig, None, {**REQUIRED[FinetuneConfig], "crop_min_scale": 0.3})
    assert cfg.data.min_scale == 0.3 and [r.getMessage() for r in caplog.records] == [MESSAGE]
    saved = to_dict(FinetuneConfig(**REQUIRED[FinetuneConfig]))
    saved["data"]["min_scale"] = 0.2  # DataConfig's default, which evaluation ignored
    saved["crop_min_scale"] = 0.3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert from_dict(FinetuneConfig, saved).data.min_scale == 0.3
    assert [r.getMessage() for r in caplog.records] == [MESSAGE]


def test_a_new_key_on_the_command_line_beats_an_old_key_in_the_recipe(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("checkpoint: x\ncrop_min_scale: 0.3\n")
    assert build_config(FinetuneConfig, recipe, {"data.min_scale": 0.6}).data.min_scale == 0.6
    new = tmp_path / "new.yaml"
    new.write_text("checkpoint: x\ndata: {min_scale: 0.3}\n")
    assert build_config(FinetuneConfig, new, {"crop_min_scale": 0.6}).data.min_scale == 0.6


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (PretrainConfig, {"precision": "fp8"}, "invalid precision='fp8': auto, bf16, fp16 or fp32"),
        (KnnConfig, {"pool": "max"}, "invalid pool='max': avg or cls"),
        (PretrainConfig, {"data.decode": "fast"}, "invalid data.decode='fast': auto, cpu or gpu"),
        (PretrainConfig, {"lr": "fast"}, "invalid lr='fast': a finite number or null"),
        (PretrainConfig, {"epochs": 2.5}, "invalid epochs=2.5: an integer"),
        (LinprobeConfig, {"optimizer": "adam"}, "invalid optimizer='adam': lars, sgd or adamw"),
        (FinetuneConfig, {"remode": "noise"}, "invalid remode='noise': const, rand or pixel"),
        (FinetuneConfig, {"data": 3}, "invalid data=3: a mapping"),
        (EmbedConfig, {"device": "tpu"}, "invalid device='tpu': auto, cpu, cuda or cuda:N"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_allowed(cls, override, message):
    with pytest.raises(ConfigError) as e:
        build_config(cls, None, {**REQUIRED[cls], **override})
    assert str(e.value) == message


def test_choices_accept_yaml_booleans_where_on_and_off_are_allowed():
    cfg = build_config(PretrainConfig, None, {"compile": False, "fp8": False, "data.gpu_resident": True})
    assert (cfg.compile, cfg.fp8, cfg.data.gpu_resident) == ("off", "off", "on")


@pytest.mark.parametrize("cls", PROTOCOLS)
def test_every_field_has_a_doc_string(cls):
    docs = field_docs(cls)
    assert not [f.name for f in fields(cls) if not docs.get(f.name)]
    assert not [f.name for f in fields(DataConfig) if not field_docs(DataConfig).get(f.name)]


def test_encoder_configs_need_a_checkpoint_but_a_scratch_fine_tune():
    for cls in (FinetuneConfig, LinprobeConfig, KnnConfig, EmbedConfig):
        assert issubclass(cls, EncoderConfig)
        with pytest.raises(ConfigError, match="invalid checkpoint=None: required"):
            cls(output="f.npy")
    assert FinetuneConfig(from_scratch=True).checkpoint is None
