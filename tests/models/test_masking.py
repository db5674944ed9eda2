"""Masking invariants: exact counts, partitions, official equivalence, uniformity, block/grid shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from maelab.models.masking import make_noise, masking_from_noise, random_masking

KINDS = ["random", "block", "grid"]


def official_masking(noise: torch.Tensor, mask_ratio: float):
    """facebookresearch/mae ``random_masking`` (mask as 0/1 float, 1 = removed)."""
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return mask, ids_keep, ids_restore, ids_shuffle


def check_invariants(m, batch: int, length: int, mask_ratio: float) -> None:
    keep = int(length * (1 - mask_ratio))
    assert m.mask.dtype == torch.bool
    assert m.mask.shape == (batch, length)
    assert m.ids_keep.shape == (batch, keep)
    assert m.ids_restore.shape == (batch, length)
    # exact count per sample
    assert torch.equal(m.mask.sum(1), torch.full((batch,), length - keep))
    for b in range(batch):
        kept = m.ids_keep[b]
        masked = torch.nonzero(m.mask[b]).flatten()
        # kept indices are distinct, visible, and together with the masked ones partition arange(L)
        assert kept.unique().numel() == keep
        assert not m.mask[b, kept].any()
        assert torch.equal(torch.sort(torch.cat([kept, masked])).values, torch.arange(length))
        # ids_restore is a permutation whose inverse starts with ids_keep
        assert torch.equal(torch.sort(m.ids_restore[b]).values, torch.arange(length))
        ids_shuffle = torch.argsort(m.ids_restore[b])
        assert torch.equal(ids_shuffle[:keep], kept)
        assert torch.equal(torch.gather(ids_shuffle, 0, m.ids_restore[b]), torch.arange(length))
        # position j of the shuffled order is masked iff j >= keep
        assert torch.equal(m.mask[b, ids_shuffle], torch.arange(length) >= keep)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [(8, 8), (4, 6), (14, 14), (6, 10)])
def test_invariants_all_kinds(kind: str, grid: tuple[int, int]) -> None:
    ratios = [0.75] if kind == "grid" else [0.0, 0.25, 0.5, 0.6, 0.75, 0.9]
    g = torch.Generator().manual_seed(1)
    for r in ratios:
        noise = make_noise(kind, 5, grid, r, generator=g)
        assert noise.shape == (5, grid[0] * grid[1])
        check_invariants(masking_from_noise(noise, r), 5, grid[0] * grid[1], r)


@settings(max_examples=60, deadline=None, database=None)
@given(batch=st.integers(1, 4), length=st.integers(2, 300), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_invariants_property(batch: int, length: int, ratio: float, seed: int) -> None:
    if int(length * (1 - ratio)) < 1:
        return  # nothing to keep is outside the official contract
    m = random_masking(batch, length, ratio, generator=torch.Generator().manual_seed(seed))
    check_invariants(m, batch, length, ratio)


@pytest.mark.parametrize("length,ratio", [(64, 0.75), (49, 0.75), (196, 0.75), (50, 0.4), (17, 0.3), (64, 0.0)])
def test_matches_official_code(length: int, ratio: float) -> None:
    noise = torch.rand(8, length, generator=torch.Generator().manual_seed(length))
    mask, ids_keep, ids_restore, _ = official_masking(noise, ratio)
    ours = masking_from_noise(noise, ratio)
    assert torch.equal(ours.mask, mask.bool())
    assert torch.equal(ours.ids_keep, ids_keep)
    assert torch.equal(ours.ids_restore, ids_restore)


def test_smallest_noise_is_kept() -> None:
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.05, 0.7]])
    m = masking_from_noise(noise, 0.5)
    assert m.mask.tolist() == [[True, False, True, False], [False, True, False, True]]
    assert m.ids_keep.tolist() == [[1, 3], [2, 0]]


def test_same_noise_same_mask_and_generator_reproducible() -> None:
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    # the mask depends on the noise's order only: a monotone map of it gives the same mask, a permutation not
    a, b = masking_from_noise(noise, 0.75), masking_from_noise(noise.mul(0.5).add(0.1), 0.75)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.mask, masking_from_noise(noise.roll(1, dims=1), 0.75).mask)
    for kind in ("random", "block"):
        n1 = make_noise(kind, 4, (8, 8), 0.75, generator=torch.Generator().manual_seed(3))
        n2 = make_noise(kind, 4, (8, 8), 0.75, generator=torch.Generator().manual_seed(3))
        n3 = make_noise(kind, 4, (8, 8), 0.75, generator=torch.Generator().manual_seed(4))
        assert torch.equal(n1, n2)
        assert not torch.equal(masking_from_noise(n1, 0.75).mask, masking_from_noise(n3, 0.75).mask)
    r1 = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(9))
    r2 = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(9))
    assert torch.equal(r1.mask, r2.mask)


def test_random_masking_covers_positions_uniformly() -> None:
    draws, length, ratio = 4000, 64, 0.75
    m = random_masking(draws, length, ratio, generator=torch.Generator().manual_seed(1234))
    p = (length - int(length * (1 - ratio))) / length
    counts = m.mask.sum(0).double()  # per-position masked count
    sd = math.sqrt(draws * p * (1 - p))  # ~27.4
    # each count is Binomial(4000, 0.75): 5.5 sd per position is safe over 64 positions (p ~ 1e-6)
    # and still catches a bias of ~4 percentage points at a single position
    assert (counts - draws * p).abs().max() < 5.5 * sd
    # chi-square over positions: ~ chi2(63) scaled by 64/63, mean ~64, sd ~11; 140 is > 6 sd
    chi2 = (((counts - draws * p) / sd) ** 2).sum()
    assert chi2 < 140
    # a biased implementation (e.g. keeping low indices more often) would show up in the halves too
    assert abs(counts[: length // 2].mean() - counts[length // 2 :].mean()) < 2 * sd


def test_model_noise_kind_random_is_uniform_too() -> None:
    noise = make_noise("random", 4000, (8, 8), 0.75, generator=torch.Generator().manual_seed(5))
    counts = masking_from_noise(noise, 0.75).mask.sum(0).double()
    sd = math.sqrt(4000 * 0.75 * 0.25)
    assert (counts - 3000).abs().max() < 5.5 * sd


@pytest.mark.parametrize("grid", [(8, 8), (4, 6), (14, 14), (2, 2)])
def test_grid_keeps_top_left_of_each_cell(grid: tuple[int, int]) -> None:
    gh, gw = grid
    m = masking_from_noise(make_noise("grid", 3, grid, 0.75), 0.75)
    rows = torch.arange(gh)[:, None].expand(gh, gw)
    cols = torch.arange(gw)[None, :].expand(gh, gw)
    expected_visible = ((rows % 2 == 0) & (cols % 2 == 0)).reshape(-1)
    for b in range(3):
        assert torch.equal(~m.mask[b], expected_visible)
    assert int(expected_visible.sum()) == int(gh * gw * 0.25)


def _masked_neighbour_fraction(mask: torch.Tensor, gh: int, gw: int) -> float:
    """Mean over masked patches of (# masked 4-neighbours) / (# 4-neighbours)."""
    m = mask.reshape(-1, 1, gh, gw).float()
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    nm = F.conv2d(m, k, padding=1)
    deg = F.conv2d(torch.ones_like(m), k, padding=1)
    return float((nm / deg)[m.bool()].mean())


@pytest.mark.parametrize(
    "grid,ratio,margin", [((8, 8), 0.4, 0.25), ((14, 14), 0.5, 0.25), ((6, 10), 0.5, 0.25), ((14, 14), 0.75, 0.1)]
)
def test_block_masks_are_clustered(grid: tuple[int, int], ratio: float, margin: float) -> None:
    gh, gw = grid
    g = torch.Generator().manual_seed(0)
    block = masking_from_noise(make_noise("block", 200, grid, ratio, generator=g), ratio)
    rand = masking_from_noise(make_noise("random", 200, grid, ratio, generator=g), ratio)
    check_invariants(block, 200, gh * gw, ratio)  # still the exact count
    fb = _masked_neighbour_fraction(block.mask, gh, gw)
    fr = _masked_neighbour_fraction(rand.mask, gh, gw)
    # random masking: a masked patch's neighbour is masked with probability ~ ratio
    assert abs(fr - ratio) < 0.05
    assert fb > fr + margin
    # the masks vary across samples (not one fixed block; small grids repeat some exact-fit rectangles)
    assert len({tuple(row.tolist()) for row in block.mask}) > 80


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_those_rows_of_the_whole_batch_and_cost_only_theirs(kind: str, monkeypatch) -> None:
    """A rank's rows (``rows=range(rank, B, world)``) equal those rows of the whole batch's noise and leave
    the generator where the whole batch does (exact resume, N ranks == 1 process); block masks are drawn
    for those rows only."""
    from maelab.models import masking

    drawn = []
    real_block_mask = masking.block_mask
    monkeypatch.setattr(masking, "block_mask", lambda *a, **kw: drawn.append(1) or real_block_mask(*a, **kw))
    whole_gen, part_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = make_noise(kind, 12, (6, 6), 0.5, generator=whole_gen)
    drawn.clear()
    part = make_noise(kind, 12, (6, 6), 0.5, generator=part_gen, rows=range(1, 12, 4))
    assert torch.equal(part, whole[1::4])
    assert torch.equal(part_gen.get_state(), whole_gen.get_state())
    assert len(drawn) == (3 if kind == "block" else 0)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, -1.0])
def test_bad_ratio_raises(ratio: float) -> None:
    noise = torch.rand(2, 16)
    with pytest.raises(ValueError):
        masking_from_noise(noise, ratio)
    with pytest.raises(ValueError):
        random_masking(2, 16, ratio)
    with pytest.raises(ValueError):
        make_noise("block", 2, (4, 4), ratio)


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError):
        make_noise("checkerboard", 2, (4, 4), 0.75)


def test_block_masks_refuse_a_device_generator():
    """Block masks are drawn on the CPU; a CUDA generator would silently fall back to the global RNG."""

    class CudaGenerator:  # stands in for torch.Generator(device="cuda") on a machine without CUDA
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="CPU torch.Generator"):
        make_noise("block", 2, (4, 4), 0.5, generator=CudaGenerator())
