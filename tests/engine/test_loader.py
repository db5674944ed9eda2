import torch
from torch.utils.data import Dataset

from maelab.data.loader import ResumableSampler, build_loader, sample_seed


class RandomDraw(Dataset):
    """Each item is a draw from torch's global RNG: shows how samples are seeded."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.rand(3), i


def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_epoch_order_is_a_permutation_and_changes_per_epoch():
    s = ResumableSampler(20, seed=1)
    s.set_epoch(0)
    e0 = [i for i, _ in s]
    s.set_epoch(1)
    e1 = [i for i, _ in s]
    assert sorted(e0) == list(range(20)) and sorted(e1) == list(range(20))
    assert e0 != e1


def test_start_skips_exactly_and_ranks_partition():
    s = ResumableSampler(20, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=7)
    assert list(s) == full[7:] and len(s) == 13
    parts = []
    for r in range(4):
        sr = ResumableSampler(20, seed=3, rank=r, world_size=4)
        sr.set_epoch(2)
        parts += [i for i, _ in sr]
    assert sorted(parts) == list(range(20))


def test_augmentation_depends_only_on_seed_epoch_index_not_workers_or_resume():
    ds = RandomDraw()
    runs = []
    for workers in (0, 2):
        s = ResumableSampler(20, seed=0)
        s.set_epoch(1)
        runs.append(_collect(build_loader(ds, 4, s, workers)))
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    s = ResumableSampler(20, seed=0)
    s.set_epoch(1, start=8)
    resumed = _collect(build_loader(ds, 4, s, 0))
    for (xa, ya), (xb, yb) in zip(runs[0][2:], resumed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(1000)}
    assert len(seeds) == 5000


def test_main_process_loading_leaves_the_global_rng_alone():
    s = ResumableSampler(20, seed=0)
    s.set_epoch(0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _collect(build_loader(RandomDraw(), 4, s, 0))
    assert torch.equal(torch.rand(3), expected)


def test_main_process_loading_leaves_the_cuda_generators_alone(monkeypatch):
    """num_workers=0: seeding each sample must not reseed the CUDA generators (``torch.manual_seed`` does), or
    drop path on the GPU would depend on the batch's last sample seed."""
    reseeded = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **kw: reseeded.append(name))
    s = ResumableSampler(20, seed=0)
    s.set_epoch(0)
    batches = _collect(build_loader(RandomDraw(), 4, s, 0))
    assert len(batches) == 5 and reseeded == []
