"""Splitting a batch into the contiguous groups e2e, mul, any, adv, one (ALGORITHM.md §3.2).

**[deviation]** The reference rounds each group's size and hands the remainder to the last group, which
can starve a weighted group (B = 6 with four equal weights gives ``adv`` nothing). We apportion by
largest remainder and then guarantee one sample to every weighted group whenever the batch allows it.
Whenever B is a multiple of the weight sum both methods give the same, exact sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import GROUPS


class BatchTooSmallError(ValueError):
    """The micro batch cannot give every active group at least one sample."""


@dataclass(frozen=True)
class GroupSplit:
    """Sizes and contiguous row ranges of each group for one batch size."""

    sizes: dict[str, int]

    @property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name in GROUPS:
            out[name] = slice(start, start + self.sizes[name])
            start += self.sizes[name]
        return out

    def masks(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        total = sum(self.sizes.values())
        out = {}
        for name, sl in self.slices.items():
            m = torch.zeros(total, dtype=torch.bool, device=device)
            m[sl] = True
            out[name] = m
        return out


def split_batch(batch_size: int, weights: dict[str, float]) -> GroupSplit:
    """Largest-remainder apportionment of ``batch_size`` rows over the groups' ``weights``."""
    active = [g for g in GROUPS if weights.get(g, 0.0) > 0]
    if batch_size < len(active):
        raise BatchTooSmallError(
            f"micro batch size {batch_size} is smaller than the number of active groups {len(active)} "
            f"({', '.join(active)}): raise the micro batch size or set some probs to 0"
        )
    total = sum(weights[g] for g in active)
    quotas = {g: batch_size * weights[g] / total for g in active}
    sizes = {g: math.floor(q + 1e-9) for g, q in quotas.items()}
    remainder = batch_size - sum(sizes.values())
    # Ties go to the earlier group, so the result is deterministic.
    by_fraction = sorted(active, key=lambda g: (-(quotas[g] - sizes[g]), GROUPS.index(g)))
    for g in by_fraction[:remainder]:
        sizes[g] += 1
    for g in active:
        if sizes[g] == 0:
            donor = max(active, key=lambda h: (sizes[h], -GROUPS.index(h)))
            sizes[donor] -= 1
            sizes[g] = 1
    return GroupSplit({g: sizes.get(g, 0) for g in GROUPS})
