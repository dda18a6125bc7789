"""Batch operations on backbone conditions.

A condition is whatever a backbone takes as ``cond`` in ``F(x_t, t, tt, cond)``: ``None`` (an
unconditional model), a tensor with the batch first, a tuple/list of those, or an object that implements
``index(idx)`` and a classmethod ``cat(conds)`` (e.g. text embeddings that must be padded to a common
length before concatenation). The objective and the sampler batch teacher passes through these two
functions only.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def index_condition(cond: Any, idx: torch.Tensor | slice) -> Any:
    """Rows ``idx`` (bool mask, index tensor or slice) of a condition."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_condition(c, idx) for c in cond)
    if hasattr(cond, "index"):
        return cond.index(idx)
    raise TypeError(f"cannot index a condition of type {type(cond).__name__}: implement index(idx)")


def cat_conditions(conds: Sequence[Any]) -> Any:
    """Concatenate conditions along the batch dimension."""
    first = conds[0]
    if first is None:
        if any(c is not None for c in conds):
            raise TypeError("cannot concatenate None with a non-None condition")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    if isinstance(first, (list, tuple)):
        return type(first)(cat_conditions([c[i] for c in conds]) for i in range(len(first)))
    if hasattr(type(first), "cat"):
        return type(first).cat(list(conds))
    raise TypeError(f"cannot concatenate conditions of type {type(first).__name__}: implement cat(conds)")


def cat_right_padded(values: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Join per-token ``values`` (B_i, L_i, ...) and their ``masks`` (B_i, L_i) along the batch, each
    right-padded to the longest L with zeros and ``mask == False``: the ``cat`` of conditions whose rows
    have different token counts (text embeddings, token ids)."""
    if not values or len(values) != len(masks):
        raise ValueError(f"cat_right_padded needs as many masks as values (at least one), got {len(values)} and {len(masks)}")
    longest = max(v.shape[1] for v in values)

    def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1]), value=value)

    return torch.cat([pad(v, 0) for v in values]), torch.cat([pad(m, False) for m in masks])
