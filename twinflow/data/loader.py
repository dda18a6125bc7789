"""Batching usable items, counting the rest, and resuming exactly where a checkpoint left off.

The datasets answer ``dataset[i]`` with an item or a :class:`Skipped` record. The loaders here pull
items one at a time (through DataLoader worker processes when ``num_workers > 0``; a DataLoader keeps
the sampler's order), drop and count the skipped ones in this process, and group the usable ones into
full batches, so a bad item never shrinks a batch. Progress is counted in *consumed* items, not in
items the workers prefetched, so ``state_dict()`` taken between batches resumes exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from .sampler import ResumableSampler
from .stats import DataError, DataStats, Skipped


class ItemDataset(Protocol):
    """What the loaders need: items by index (possibly :class:`Skipped`) and a batch collate."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def collate(self, items: list[Any]) -> Any: ...


def _identity(item: Any) -> Any:
    return item


def _fetch(dataset: ItemDataset, indices: Sequence[int], num_workers: int) -> Iterable[Any]:
    """``dataset[i]`` for ``indices`` in order, decoded in ``num_workers`` processes (0: here)."""
    if num_workers == 0:
        return (dataset[i] for i in indices)
    return torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=None,
        sampler=list(indices),
        num_workers=num_workers,
        collate_fn=_identity,
    )


class ResumableLoader:
    """An endless stream of full batches in the order of a :class:`ResumableSampler`.

    Epochs follow one another; a batch may hold the end of one epoch and the start of the next.
    ``stats`` counts skipped items (starting from the dataset's ``scan_stats`` when it has them). If a
    whole epoch's worth of consecutive items is unusable, :class:`DataError` is raised instead of
    looping forever. Use one iterator at a time: the position lives in the loader.
    """

    def __init__(
        self,
        dataset: ItemDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = ResumableSampler(len(dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        self.stats = DataStats()
        scan_stats = getattr(dataset, "scan_stats", None)
        if scan_stats is not None:
            self.stats.update(scan_stats)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        buffer: list[Any] = []
        unusable_run = 0
        while True:
            remaining = sampler.epoch_indices(sampler.epoch)[sampler.position :].tolist()
            for item in _fetch(self.dataset, remaining, self.num_workers):
                sampler.position += 1
                if isinstance(item, Skipped):
                    self.stats.record_skipped(item)
                    unusable_run += 1
                    if unusable_run >= sampler.items_per_rank:
                        raise DataError(
                            f"no usable item in a whole epoch ({sampler.items_per_rank} items drawn on rank "
                            f"{sampler.rank}); {self.stats.summary()}"
                        )
                    continue
                unusable_run = 0
                buffer.append(item)
                if len(buffer) == self.batch_size:
                    batch, buffer = self.dataset.collate(buffer), []
                    yield batch
            sampler.set_epoch(sampler.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts (call between batches)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def iter_batches_in_order(
    dataset: ItemDataset,
    batch_size: int,
    stats: DataStats,
    *,
    num_workers: int = 0,
    on_item: Callable[[], None] | None = None,
) -> Iterator[Any]:
    """One pass over ``dataset`` in index order: batches of usable items (the last may be smaller).

    Skipped items go to ``stats``; ``on_item`` is called once per item consumed (for a progress bar).
    Raises :class:`DataError` if no item at all is usable.
    """
    buffer: list[Any] = []
    used = 0
    for item in _fetch(dataset, range(len(dataset)), num_workers):
        if on_item is not None:
            on_item()
        if isinstance(item, Skipped):
            stats.record_skipped(item)
            continue
        used += 1
        buffer.append(item)
        if len(buffer) == batch_size:
            batch, buffer = dataset.collate(buffer), []
            yield batch
    if buffer:
        yield dataset.collate(buffer)
    if used == 0:
        raise DataError(f"no usable item among {len(dataset)}; {stats.summary()}")
