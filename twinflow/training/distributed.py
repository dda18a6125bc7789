"""Process-group start-up and the few collectives the trainer needs beyond DeepSpeed's own.

``deepspeed`` (the launcher) starts one process per rank with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` set; :func:`init_distributed` joins the group with NCCL on CUDA and gloo
on CPU. A process started without the launcher (a notebook, a single-process test) becomes a
one-rank group on a free local port, so the same trainer code runs in-process.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create, for a single process) the default process group and pick this rank's device.

    ``backend``: ``auto`` (NCCL when CUDA is available, else gloo), ``nccl`` or ``gloo``.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))}
        )
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("config key 'deepspeed.dist_backend' is 'nccl' but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the machine's cores; oversubscribed OpenMP threads spin against each other
        # and make small matrix products ~100x slower. The launcher sets LOCAL_SIZE (ranks on this node).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (one tiny all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small float tensor over ranks (for logging)."""
    import torch.distributed as dist

    out = values.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
