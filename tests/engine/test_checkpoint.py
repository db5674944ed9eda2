import os

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS
from tests.test_io import TOO_LARGE, file_size_limit

import maelab
from maelab.config import to_dict
from maelab.engine.checkpoint import (
    LAST,
    atomic_link,
    atomic_save,
    load_pretrained,
    load_resume_state,
    periodic_checkpoints,
    rotate,
)
from maelab.errors import CheckpointError


def test_atomic_save_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ck" / LAST
    atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    atomic_save({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    state = torch.load(path, weights_only=False)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.zeros(3))
    assert sorted(os.listdir(path.parent)) == [LAST]


def test_a_save_failing_partway_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write (a file-size limit between the two checkpoints' sizes, as a full disk): one line naming
    the file and the reason, the previous last.pt byte for byte, no temporary file."""
    path = tmp_path / LAST
    atomic_save({"model": {"w": torch.zeros(10)}, "step": 1}, path)
    before = path.read_bytes()
    with file_size_limit(len(before) + 1000), pytest.raises(CheckpointError) as e:
        atomic_save({"model": {"w": torch.zeros(10_000)}, "step": 2}, path)
    assert str(e.value) == f"cannot write checkpoint {path} ({TOO_LARGE}); the previous {LAST} is intact"
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [LAST]


def test_a_copy_failing_partway_keeps_the_previous_periodic_checkpoint(tmp_path, monkeypatch):
    """atomic_link where the filesystem has no hard links copies; a real failed copy is one line too."""
    old = atomic_save({"model": {"w": torch.zeros(10)}, "step": 1}, tmp_path / "epoch_0001.pt")
    before = old.read_bytes()
    last = atomic_save({"model": {"w": torch.zeros(10_000)}, "step": 2}, tmp_path / LAST)

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    with file_size_limit(len(before) + 1000), pytest.raises(CheckpointError) as e:
        atomic_link(last, old)
    assert str(e.value) == f"cannot write checkpoint {old} ({TOO_LARGE}); the previous epoch_0001.pt is intact"
    assert old.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.pt", LAST]


def test_corrupt_last_falls_back_to_newest_good_periodic(tmp_path, caplog):
    atomic_save({"model": {}, "step": 5}, tmp_path / "epoch_0001.pt")
    atomic_save({"model": {}, "step": 10}, tmp_path / "epoch_0002.pt")
    data = (tmp_path / "epoch_0002.pt").read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])  # truncated
    state, path = load_resume_state(tmp_path)
    assert path.name == "epoch_0002.pt" and state["step"] == 10
    assert "corrupt" in caplog.text


def test_all_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_resume_state(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_resume_state(tmp_path / "empty")


def test_rotate_keeps_newest(tmp_path):
    for i in range(5):
        atomic_save({"model": {}, "step": i}, tmp_path / f"epoch_{i:04d}.pt")
    atomic_save({"model": {}, "step": 9}, tmp_path / LAST)
    rotate(tmp_path, keep_last=2)
    assert [p.name for p in periodic_checkpoints(tmp_path)] == ["epoch_0003.pt", "epoch_0004.pt"]
    assert (tmp_path / LAST).exists()


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-copy"])
def test_atomic_link_names_the_same_bytes_and_leaves_no_temp_file(tmp_path, monkeypatch, links):
    last = atomic_save({"model": {}, "step": 4}, tmp_path / LAST)
    if not links:

        def no_links(src, dst):
            raise OSError("hard links not supported")

        monkeypatch.setattr(os, "link", no_links)
    atomic_link(last, tmp_path / "epoch_0001.pt")
    atomic_link(last, tmp_path / "epoch_0001.pt")  # again: already a name of that file
    assert (tmp_path / "epoch_0001.pt").read_bytes() == last.read_bytes()
    assert os.path.samefile(last, tmp_path / "epoch_0001.pt") == links
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.pt", LAST]


def test_load_pretrained_from_maelab_official_and_exported(tmp_path):
    model = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    x = torch.randn(2, 3, 32, 32)
    ref = model.forward_features(x)
    atomic_save(
        {"model": model.state_dict(), "model_config": to_dict(model.cfg), "step": 3},
        tmp_path / "run" / "checkpoints" / LAST,
    )
    from_run = load_pretrained(tmp_path / "run")
    assert from_run.cfg == model.cfg
    torch.testing.assert_close(from_run.forward_features(x), ref)
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    official = load_pretrained(tmp_path / "official.pth", num_heads=2, decoder_num_heads=2)
    torch.testing.assert_close(official.forward_features(x), ref)
    maelab.export_encoder(model, tmp_path / "enc.safetensors")
    exported = load_pretrained(tmp_path / "enc.safetensors")
    torch.testing.assert_close(exported.forward_features(x), ref)


def test_load_pretrained_missing_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(tmp_path / "bad.pt")
