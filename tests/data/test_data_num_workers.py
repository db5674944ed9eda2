"""data.num_workers=auto: this process's share of the node's CPUs, resolved when the config is built."""

from __future__ import annotations

import os

import pytest

from maelab.config import DataConfig, PretrainConfig, build_config, to_dict
from maelab.errors import ConfigError


@pytest.mark.parametrize(
    ("cpus", "local", "expected"), [(2, None, 2), (96, "8", 12), (64, "1", 16), (4, "8", 1), (8, "junk", 8)]
)
def test_auto_num_workers(monkeypatch, cpus, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert DataConfig.auto_num_workers() == expected
    cfg = build_config(PretrainConfig, None, {"data.num_workers": "auto"})
    assert cfg.data.num_workers == expected and DataConfig().num_workers == expected
    assert to_dict(cfg)["data"]["num_workers"] == expected  # config.yaml records the number used


def test_num_workers_values():
    assert build_config(PretrainConfig, None, {"data.num_workers": 0}).data.num_workers == 0
    assert build_config(PretrainConfig, None, {"data.num_workers": 7.0}).data.num_workers == 7
    for bad in (-1, "many", 2.5):
        with pytest.raises(ConfigError, match=r"invalid data.num_workers=.*: 0 or more, or auto"):
            build_config(PretrainConfig, None, {"data.num_workers": bad})
    with pytest.raises(ConfigError, match=r"invalid data.num_workers=True"):
        build_config(PretrainConfig, None, {"data.num_workers": True})
