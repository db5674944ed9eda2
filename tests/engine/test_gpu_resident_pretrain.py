import json
import pytest
from maelab.config import PretrainConfig, build_config
from maelab.data.gpu import GPUBatchLoader
from maelab.engine.pretrain import Pretrainer, pretrain
from tests.engine.test_pretrain import tiny_cfg, weights, assert_same_weights


def test_config_values(tmp_path):
    assert tiny_cfg(tmp_path).data.gpu_resident == "auto"
    assert build_config(PretrainConfig, None, {"data.gpu_resident": True}).data.gpu_resident == "on"
    assert build_config(PretrainConfig, None, {"data.gpu_resident": False}).data.gpu_resident == "off"
    with pytest.raises(Exception, match="gpu_resident"):
        build_config(PretrainConfig, None, {"data.gpu_resident": "maybe"})
    t = Pretrainer(tiny_cfg(tmp_path / "a"), progress=False)
    assert not isinstance(t.loader, GPUBatchLoader)  # auto on CPU: off
    t = Pretrainer(tiny_cfg(tmp_path / "b", **{"data.gpu_resident": "on"}), progress=False)
    assert isinstance(t.loader, GPUBatchLoader)


@pytest.mark.parametrize("accum", [1, 2])
def test_gpu_resident_resume_exact(tmp_path, accum):
    kw = {"data.gpu_resident": "on", "accum_steps": accum}
    full = tiny_cfg(tmp_path / "full", **kw)
    pretrain(full, progress=False)
    part = tiny_cfg(tmp_path / "part", **kw)
    stopped = pretrain(part, progress=False, max_steps=3)
    assert stopped.stopped_early
    pretrain(part, resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_gpu_resident_loss_falls(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=6, **{"data.num_samples": 128, "data.gpu_resident": "on"})
    pretrain(cfg, progress=False)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"], [r["loss"] for r in recs]
