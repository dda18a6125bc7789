"""Guided rows depend on each rank's random times, so one rank can have none while another has some.
Under ZeRO-3 every forward of the teacher gathers its parameters collectively: a rank that skipped the
guidance forward left the others waiting (a 2-rank SD3.5 LoRA launch hung in step 4). Two gloo ranks
here, with a teacher whose forward is a collective as ZeRO-3's is: both must call it the same number of
times, and the rank without guided rows must still return zero guidance."""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twinflow.method.objective import TwinFlowObjective


class CollectiveTeacher:
    """Stands in for a ZeRO-3 partitioned model: each call all-reduces (gathers), then answers x * 2."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, tt, cond):
        self.calls += 1
        gathered = torch.ones(1)
        dist.all_reduce(gathered)
        return x * 2


def _rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        B = 4
        x_t = torch.randn(B, 2, 4, 4)
        t = torch.full((B,), 0.5)
        cond = torch.zeros(B, 3)
        rows = torch.zeros(B, dtype=torch.bool)
        if rank == 1:
            rows[1] = True
        teacher = CollectiveTeacher()
        v_c, v_u = TwinFlowObjective._guidance(None, teacher, x_t, t, cond, cond, rows, torch.zeros_like(x_t),
                                               torch.float32)
        dist.barrier()
        results[rank] = (teacher.calls, bool(v_c.abs().sum() == 0), bool(v_c[1].abs().sum() > 0))
    finally:
        dist.destroy_process_group()


def test_ranks_run_the_guidance_forward_together():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="spawn", join=True)
    assert results[0] == (1, True, False)  # ran the forward on a dummy row and kept zero guidance
    assert results[1] == (1, False, True)
