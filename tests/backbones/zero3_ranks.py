"""Spawn the two gloo ranks of a ZeRO-3 worker script (``*_zero3_worker.py``) and report a rank's failure.

``run_ranks(check, *args)`` runs ``check(*args)`` on every rank after ``deepspeed.init_distributed`` and
exits the script non-zero with the first failing rank's traceback; prints ``ZERO3 OK`` otherwise.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

WORLD = 2


def _rank(rank: int, port: int, check: Callable[..., None], args: tuple[Any, ...], failures: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)  # two ranks on a small CPU machine: oversubscribed threads stall the collectives
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        from twinflow.training.distributed import release_cpu_shm_name

        release_cpu_shm_name()  # DeepSpeed leaves its /dev/shm workspace otherwise
        check(*args)
    except BaseException as e:  # reported to the parent, which fails the test
        import traceback

        failures.put(f"rank {rank}: {e!r}\n{traceback.format_exc()}")
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(check: Callable[..., None], *args: Any) -> None:
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), check, args, failures), nprocs=WORLD, join=True, start_method="spawn")
    if not failures.empty():
        print(failures.get(), file=sys.stderr)
        sys.exit(1)
    print("ZERO3 OK")
