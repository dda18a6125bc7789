"""A deterministic, resumable, rank-sharded sampling order.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])`` (or the
identity without shuffling), truncated to a multiple of ``world_size`` and dealt round-robin: rank ``r``
takes positions ``r, r + W, r + 2W, ...``. So every rank sees the same number of items per epoch (the
ranks stay in step) and the ranks' shards are disjoint; the ``N mod W`` items cut off differ from epoch
to epoch when shuffling. ``(seed, epoch, position)`` fully determines what comes next, which is what a
checkpoint stores to resume mid-epoch.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .stats import DataError


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's dataset indices for ``epoch`` from ``position`` on, advancing ``position``."""

    def __init__(self, num_items: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}")
        if num_items < world_size:
            raise DataError(f"{num_items} usable item(s) cannot be shared among {world_size} ranks")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    @property
    def items_per_rank(self) -> int:
        """Items this rank sees per epoch (the same on every rank)."""
        return self.num_items // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return order[: self.items_per_rank * self.world_size][self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return self.items_per_rank - self.position

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            index = int(indices[self.position])
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_items": self.num_items,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s epoch and position; the order must be the one the state was made with."""
        for name in ("seed", "shuffle", "num_items", "world_size"):
            if state.get(name) != getattr(self, name):
                raise DataError(
                    f"cannot resume the data order: checkpoint has {name}={state.get(name)!r}, "
                    f"this run has {name}={getattr(self, name)!r}"
                )
        position = int(state["position"])
        if not 0 <= position <= self.items_per_rank:
            raise DataError(f"cannot resume the data order: position {position} outside [0, {self.items_per_rank}]")
        self.epoch, self.position = int(state["epoch"]), position
