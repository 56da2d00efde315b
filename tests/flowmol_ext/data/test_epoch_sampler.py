"""EpochSampler: per-epoch order and prior-noise seeds from (seed, epoch, position); resume skips;
sharding over ranks covers every molecule once per epoch (padding as DistributedSampler)."""

from __future__ import annotations

import pytest

from flowmol_ext.data.datamodule import EpochSampler


def test_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochSampler(50, seed=3, shuffle=True), EpochSampler(50, seed=3, shuffle=True)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(i for i, _ in first) == sorted(i for i, _ in second) == list(range(50))
    assert [i for i, _ in first] != [i for i, _ in second]
    assert {s for _, s in first}.isdisjoint({s for _, s in second})  # fresh prior noise each epoch
    assert list(EpochSampler(50, seed=4, shuffle=True)) != first


def test_resume_skips_the_trained_part_of_the_epoch_once() -> None:
    s = EpochSampler(20, seed=0, shuffle=True)
    s.set_epoch(2)
    full = list(s)
    s.resume_at(7)
    assert list(s) == full[7:]
    assert list(s) == full  # only the first iteration after resume_at skips


@pytest.mark.parametrize("n", [10, 11, 3])
def test_ranks_share_each_epoch(n: int) -> None:
    world = 4
    shards = [list(EpochSampler(n, seed=1, shuffle=True, rank=r, world=world)) for r in range(world)]
    assert len({len(sh) for sh in shards}) == 1 and len(shards[0]) == -(-n // world)
    items = [it for sh in shards for it in sh]
    assert {i for i, _ in items} == set(range(n))  # every molecule, duplicates only as padding
    assert len({s for _, s in items}) == len(items)  # padded duplicates get their own noise
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(n, seed=1, shuffle=True, rank=4, world=4)
