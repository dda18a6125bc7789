"""Device, profile and timing helpers shared by the pytest-benchmark suite and ``run_gpu.py``.

Profiles. ``TWINFLOW_BENCH_SIZE=smoke`` (the default) runs every benchmark at a tiny size on whatever
device is present, so CI exercises the whole harness in seconds; on a CPU-only machine the Triton
kernels run under Triton's interpreter there, which checks the harness, not performance.
``TWINFLOW_BENCH_SIZE=gpu`` runs the Qwen-Image sizes and needs a CUDA device.

Timing. GPU work is asynchronous, so a wall-clock reading is only meaningful after the device has
drained its queue: :func:`synchronized_timer` synchronises and then reads ``perf_counter``, and is the
timer given to pytest-benchmark. A round runs the measured call ``iterations`` times back to back and
synchronises once, so the synchronisation cost is spread over the round. ``run_gpu.py`` times the same
callables with :func:`measure` (the same round structure, without pytest).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

PROFILE_ENV = "TWINFLOW_BENCH_SIZE"
PROFILES = ("smoke", "gpu")

# Peak dense bf16 tensor-core throughput (TFLOP/s, without sparsity) from the vendors' data sheets,
# keyed by a substring of ``torch.cuda.get_device_name()``. Checked in order (PCIe/NVL before the
# plain name). Used only to turn measured FLOP/s into a utilisation; a device missing here gets no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def active_profile() -> str:
    """The profile named by ``TWINFLOW_BENCH_SIZE`` (``smoke`` when unset)."""
    profile = os.environ.get(PROFILE_ENV, "smoke").strip().lower() or "smoke"
    if profile not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={profile!r}; expected one of {PROFILES}")
    return profile


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gpu_skip_reason(profile: str) -> Optional[str]:
    """Why GPU-size measurements cannot run here (None when they can)."""
    if torch.cuda.is_available():
        return None
    if profile == "gpu":
        return "the gpu profile needs a CUDA device (torch.cuda.is_available() is False)"
    return "no CUDA device on this machine (torch.cuda.is_available() is False); CPU smoke sizes only"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def peak_bf16_tflops(name: str) -> Optional[float]:
    """The data-sheet dense bf16 peak for a CUDA device name, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_timer() -> float:
    """``perf_counter`` read after the current CUDA device (if any is initialised) has finished its work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class TimingPlan:
    """How a call is timed: ``warmup`` untimed calls, then ``rounds`` rounds of ``iterations`` calls."""

    rounds: int
    iterations: int
    warmup: int


SMOKE_PLAN = TimingPlan(rounds=2, iterations=1, warmup=0)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def plan_for(fn: Callable[[], object], device: torch.device, profile: str) -> TimingPlan:
    """How to time an already warm ``fn``. Smoke runs do 2 single-call rounds: they check the harness,
    and the interpreted kernels take ~0.1-0.5 s a call. On GPU the rounds are sized from one timed call:
    each round lasts at least ~20 ms (so its one synchronisation is noise), 5-20 rounds, ~0.5 s in all."""
    if profile == "smoke":
        return SMOKE_PLAN
    seconds = time_once(fn, device)
    iterations = max(1, math.ceil(0.02 / max(seconds, 1e-7)))
    rounds = max(5, min(20, math.ceil(0.5 / max(seconds * iterations, 1e-7))))
    return TimingPlan(rounds=rounds, iterations=iterations, warmup=2)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed rounds."""

    median_s: float
    min_s: float
    rounds: int
    iterations: int

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "rounds": self.rounds, "iterations": self.iterations}


def measure(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> Timing:
    """Times ``fn`` without pytest: per round, ``iterations`` calls between two synchronised readings."""
    for _ in range(plan.warmup):
        fn()
    per_call = []
    for _ in range(plan.rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(plan.iterations):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / plan.iterations)
    return Timing(statistics.median(per_call), min(per_call), plan.rounds, plan.iterations)


def pytest_benchmark_timing(benchmark, fn: Callable[[], object], plan: TimingPlan) -> Optional[Timing]:
    """Times ``fn`` with pytest-benchmark (the test module installs :func:`synchronized_timer`).

    Under ``--benchmark-disable`` pytest-benchmark runs ``fn`` once and keeps no statistics: returns None.
    """
    benchmark.pedantic(fn, rounds=plan.rounds, iterations=plan.iterations, warmup_rounds=plan.warmup)
    if benchmark.stats is None:
        return None
    stats = benchmark.stats.stats
    return Timing(stats.median, stats.min, plan.rounds, plan.iterations)


def copy_bandwidth(device: torch.device, profile: str) -> dict:
    """The device's copy bandwidth, measured as ``dst.copy_(src)`` of one large float32 buffer.

    Bytes moved per copy = 2 x the buffer size (one read, one write). 2 GiB on GPU (far above any L2),
    64 MiB in smoke runs. Timed with :func:`measure` in both runners. The memory-bound kernels report
    their GB/s as a fraction of this number.
    """
    nbytes = 2 * 1024**3 if profile == "gpu" else 64 * 1024**2
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    copy()
    timing = measure(copy, device, plan_for(copy, device, profile))
    moved = 2 * nbytes
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"buffer_bytes": nbytes, "bytes_moved": moved, "gbps": moved / timing.median_s / 1e9, **timing.as_dict()}
