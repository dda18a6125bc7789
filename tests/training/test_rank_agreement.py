"""``all_ranks_agree`` on 2 real gloo ranks (spawned processes, no DeepSpeed: a few seconds).

The launcher test (``test_distributed.py``) fails rank 0's checkpoint commit in a real run; these pin the
helper itself: the same one-line error on every rank, a deferred error that keeps the failing rank in the
section's collectives, the lowest failing rank wins, and success costs nothing but the agreement.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twinflow.training.distributed import RankFailure, all_ranks_agree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail(message: str) -> None:
    raise OSError(message)


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    try:
        with all_ranks_agree("rank-0 section"):
            if rank == 0:
                _fail("disk full")
    except RankFailure as e:
        out["plain"] = str(e)
    # A failure between collectives: rank 0 keeps taking part in every all-reduce until the exit.
    sums = []
    try:
        with all_ranks_agree("deferred section") as section:
            for i in range(4):
                t = torch.tensor([float(i)])
                dist.all_reduce(t)
                sums.append(float(t))
                if rank == 0 and i >= 1:
                    section.run(_fail, f"item {i}")
    except RankFailure as e:
        out["deferred"] = str(e)
        out["sums"] = sums
    try:
        with all_ranks_agree("both fail"):
            raise ValueError(f"bad on rank {rank}")
    except RankFailure as e:
        out["both"] = str(e)
    with all_ranks_agree("nothing fails"):
        pass
    out["after"] = True
    results[rank] = out
    dist.destroy_process_group()


def test_an_error_on_one_rank_fails_every_rank_with_its_message():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = results[rank]
        assert got["plain"] == "rank-0 section failed on rank 0: OSError: disk full"
        assert got["deferred"] == "deferred section failed on rank 0: OSError: item 1"
        assert got["sums"] == [0.0, 2.0, 4.0, 6.0]
        assert got["both"] == "both fail failed on rank 0: ValueError: bad on rank 0"
        assert got["after"]


def test_without_a_process_group_the_error_passes_unchanged():
    with pytest.raises(OSError, match="disk full"):
        with all_ranks_agree("section"):
            _fail("disk full")
    section = all_ranks_agree("deferred")
    with pytest.raises(OSError, match="first"):
        with section:
            section.run(_fail, "first")
            assert section.run(_fail, "second") is None  # skipped after the first error
