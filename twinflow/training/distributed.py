"""Process-group start-up and the few collectives the trainer needs beyond DeepSpeed's own.

``deepspeed`` (the launcher) starts one process per rank with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` set; :func:`init_distributed` joins the group with NCCL on CUDA and gloo
on CPU. A process started without the launcher (a notebook, a single-process test) becomes a
one-rank group on a free local port, so the same trainer code runs in-process.

Rank-0-only work (the checkpoint commit, export and log writes, prompt encoding) runs inside
:class:`all_ranks_agree`: an error on one rank then fails every rank at the end of the section with that
rank's message, instead of leaving the others waiting in their next collective.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

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
        if not cuda:
            release_cpu_shm_name()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""Where DeepSpeed's CPU all-reduce keeps a rank's shared workspace (``ops/csrc/cpu/comm/shm.cpp``)."""


def release_cpu_shm_name() -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace name right after ``init_distributed``.

    On CPU, DeepSpeed creates one 66 MiB file per rank in ``/dev/shm`` (RAM) and never unlinks it: every
    launch left them behind. On this project's 2-core, 24 GiB machine 331 of them (from a day of test and
    demo launches) held 22 GiB, and the kernel's OOM killer ended a demo run. Each rank opens and maps
    every peer's workspace inside ``deepspeed.init_distributed``; after a barrier no rank needs the names,
    so each unlinks its own, and the mappings stay valid until the process ends (also if it is killed)."""
    import torch.distributed as dist

    env = os.environ
    name = SHM_BUFFER.format(uid=os.getuid(), addr=env.get("MASTER_ADDR", ""), port=env.get("MASTER_PORT", ""),
                             rank=dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def shutdown_distributed() -> None:
    """Destroy the process group at the end of a training process. Left to interpreter teardown, the
    backend's threads can be destroyed while still joinable: a 2-rank CPU run that had finished training
    once died that way with SIGABRT ("terminate called without an active exception"), and PyTorch warns
    about it under NCCL."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


class RankFailure(RuntimeError):
    """A section under :class:`all_ranks_agree` failed on some rank; raised on every rank with its message."""


class all_ranks_agree:
    """Context manager for a section that some ranks (usually rank 0 alone) run and all must agree on.

    Every rank enters the section; on exit the ranks agree on success with one tiny all-reduce (a
    synchronisation point, so it also serves as the barrier after the section). If any rank raised, every
    rank raises :class:`RankFailure` with the same one-line message, ``"<what> failed on rank <r>:
    <ExceptionType>: <message>"`` (the lowest failing rank; on that rank chained to the original error),
    so all ranks exit together. Without a process group of several ranks the section is transparent: its
    error propagates unchanged.

    The section's body must not call collectives after the point where it may fail, or a failing rank
    would skip collectives the others wait in. A body that interleaves rank-0 work with collectives (a
    gather per parameter) runs that work through :meth:`run`: the first error is kept, the rest of the
    rank's guarded work is skipped, and the rank keeps taking part in the collectives until the exit::

        with all_ranks_agree("checkpoint commit"):
            if rank == 0:
                commit()

        with all_ranks_agree("gathering the weights") as section:
            for param in params:
                with GatheredParameters([param]):
                    if rank == 0:
                        section.run(copy_out, param)
    """

    def __init__(self, what: str):
        self.what = what
        self._error: Optional[BaseException] = None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` unless an earlier call failed; an error is kept for the exit (``None``)."""
        if self._error is None:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (re-raised on every rank at the exit)
                self._error = e
        return None

    def __enter__(self) -> "all_ranks_agree":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import torch.distributed as dist

        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: not an outcome to agree on
        error = self._error if self._error is not None else exc
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            if error is not None and error is not exc:
                raise error
            return False
        world = dist.get_world_size()
        first = torch.tensor([dist.get_rank() if error is not None else world], device=collective_device())
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        failed = int(first.item())
        if failed == world:
            return False
        payload = [f"{type(error).__name__}: {error}" if dist.get_rank() == failed else None]
        dist.broadcast_object_list(payload, src=failed)
        raise RankFailure(f"{self.what} failed on rank {failed}: {payload[0]}") from error
