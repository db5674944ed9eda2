"""Fuzzing config parsing: any input is a valid config or one ConfigError, nothing else."""

from dataclasses import fields

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maelab.config import RENAMED_KEYS, DataConfig, PretrainConfig, build_config, from_dict
from maelab.errors import ConfigError
from maelab.eval.config import EmbedConfig, FinetuneConfig, KnnConfig, LinprobeConfig
from maelab.models.registry import get_config

NESTED_KEYS = (
    [f"data.{f.name}" for f in fields(DataConfig)]
    + ["model_args.mask_ratio", "model_args.img_size", "model_args.patch_size", "model_args.depth", "bogus"]
    + list(RENAMED_KEYS)  # old names: moved to the new ones (or refused next to them)
)
KEYS = [f.name for f in fields(PretrainConfig)] + NESTED_KEYS
EVAL_CONFIGS = [FinetuneConfig, LinprobeConfig, KnnConfig, EmbedConfig]
EVAL_KEYS = sorted({f.name for cls in EVAL_CONFIGS for f in fields(cls)}) + NESTED_KEYS
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    try:
        cfg = build_config(PretrainConfig, None, overrides)
        get_config(cfg.model, **cfg.model_args)
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(EVAL_CONFIGS),
    st.dictionaries(st.sampled_from(EVAL_KEYS), VALUES, max_size=5),
)
def test_random_evaluation_overrides_give_a_config_or_a_config_error(cls, overrides):
    try:
        build_config(cls, None, {"checkpoint": "x", "output": "f.npy", **overrides})
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_random_yaml_bytes_give_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(data)
    try:
        build_config(PretrainConfig, path)
    except ConfigError as e:
        assert str(path) in str(e)


def test_nested_section_must_be_a_mapping():
    try:
        from_dict(PretrainConfig, {"data": 3})
    except ConfigError as e:
        assert "data" in str(e)
    else:
        raise AssertionError("accepted data=3")
