"""The sampling order: deterministic, resumable mid-epoch, disjoint across ranks."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import CAPTIONS, image_bytes, write_parquet
from twinflow.data import DataConfig, DataError, ParquetImageTextDataset, ResumableLoader, ResumableSampler, Skipped


def _take(sampler: ResumableSampler, n: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = ResumableSampler(50, seed=7), ResumableSampler(50, seed=7)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(50))
    assert first != list(range(50))  # shuffled
    a.set_epoch(1)
    second = list(a)
    assert sorted(second) == list(range(50)) and second != first
    assert list(ResumableSampler(50, seed=8)) != first
    assert list(ResumableSampler(50, shuffle=False)) == list(range(50))


def test_resume_mid_epoch_gives_the_same_sequence() -> None:
    reference = ResumableSampler(23, seed=1)
    reference.set_epoch(2)
    full = list(reference)

    sampler = ResumableSampler(23, seed=1)
    sampler.set_epoch(2)
    head = _take(sampler, 9)
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 9

    resumed = ResumableSampler(23, seed=1)
    resumed.load_state_dict(state)
    assert len(resumed) == 14
    assert head + list(resumed) == full

    with pytest.raises(DataError, match="checkpoint has seed=1, this run has seed=2"):
        ResumableSampler(23, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="world_size"):
        ResumableSampler(23, seed=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shards_are_disjoint_and_equal(world_size: int) -> None:
    n = 29
    for epoch in range(3):
        shards = []
        for rank in range(world_size):
            sampler = ResumableSampler(n, seed=5, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert all(len(s) == n // world_size for s in shards)
        union = [i for s in shards for i in s]
        assert len(set(union)) == len(union) == (n // world_size) * world_size
    with pytest.raises(DataError, match="cannot be shared among 4 ranks"):
        ResumableSampler(3, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not valid for world_size 2"):
        ResumableSampler(10, rank=2, world_size=2)


def _mixed_dataset(tmp_path: Path) -> ParquetImageTextDataset:
    rows = [{"caption": c, "image": image_bytes(i)} for i, c in enumerate(CAPTIONS)]
    rows.insert(3, {"caption": "broken", "image": b"not an image"})
    rows.insert(6, {"caption": "broken too", "image": b"nor this"})
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    return ParquetImageTextDataset(DataConfig(source="parquet", paths=[str(path)], image_size=16))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_exactly_with_skips_and_epoch_boundaries(tmp_path: Path, num_workers: int) -> None:
    dataset = _mixed_dataset(tmp_path)  # 9 items, 2 unusable: batches of 3 straddle epochs
    loader = ResumableLoader(dataset, batch_size=3, seed=11, num_workers=num_workers)
    stream = iter(loader)
    uninterrupted = [next(stream).indices for _ in range(7)]
    assert loader.epoch >= 2
    assert all(len(ix) == 3 for ix in uninterrupted)  # bad items never shrink a batch
    assert loader.stats.as_dict()["not_an_image"] == 2

    first = ResumableLoader(dataset, batch_size=3, seed=11, num_workers=num_workers)
    stream = iter(first)
    head = [next(stream).indices for _ in range(4)]
    state = first.state_dict()
    del stream

    resumed = ResumableLoader(dataset, batch_size=3, seed=11, num_workers=num_workers)
    resumed.load_state_dict(state)
    stream = iter(resumed)
    tail = [next(stream).indices for _ in range(3)]
    assert head + tail == uninterrupted


def test_ranks_of_a_loader_see_disjoint_items(tmp_path: Path) -> None:
    dataset = _mixed_dataset(tmp_path)
    usable = {i for i in range(len(dataset)) if not isinstance(dataset[i], Skipped)}
    per_rank = []
    for rank in range(2):
        loader = ResumableLoader(dataset, batch_size=1, seed=4, rank=rank, world_size=2)
        expected = [i for i in loader.sampler.epoch_indices(0).tolist() if i in usable]
        stream = iter(loader)
        got = [next(stream).indices[0] for _ in expected]
        assert got == expected and loader.epoch == 0
        per_rank.append(set(got))
    assert per_rank[0] and per_rank[1] and not (per_rank[0] & per_rank[1])
