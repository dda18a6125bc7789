"""Helpers for code that must also run on DeepSpeed ZeRO-3 partitioned parameters.

Under ``deepspeed.zero.Init`` every parameter is partitioned as soon as the module that owns it finishes
``__init__``: ``param.data`` is then empty and this rank's shard lives in ``param.ds_tensor``. Code that
reads or writes whole parameters outside a forward (copying one embedder into another, re-initialising
LoRA weights) must gather them first; code that works element-wise (an EMA) can work on the shards.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (created under ``deepspeed.zero.Init``)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Make the full values of ``params`` available inside the block.

    A no-op for ordinary parameters. For partitioned ones this is ``deepspeed.zero.GatheredParameters``;
    with ``modify=True`` rank 0's values are broadcast and re-partitioned on exit, so writes made inside
    the block persist consistently on every rank.
    """
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``param``: the shard for a partitioned parameter, else the data itself."""
    return param.ds_tensor if is_partitioned(param) else param.data


def zero_init_active() -> bool:
    """Whether code runs inside ``deepspeed.zero.Init`` (modules built now get partitioned parameters)."""
    try:
        from deepspeed.runtime.zero import partition_parameters
    except ImportError:
        return False
    return getattr(partition_parameters, "top_level_context", None) is not None
