"""Kernel benchmarks: each fused kernel against its eager reference and ``torch.compile`` of it (and
the EMA against ``torch._foreach_lerp_``), one pytest-benchmark test per (case, pass, variant).

Every test first checks that its variant computes what the eager reference computes. Tensors of one
case are allocated once and shared by its consecutive tests (GPU cases take up to ~26 GB).
"""
from __future__ import annotations

import gc

import pytest
import torch

from .harness import active_profile, gpu_skip_reason, pytest_benchmark_timing, synchronized_timer
from .kernel_cases import kernel_cases, measure_variant, prepare

PROFILE = active_profile()
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


class _CaseCache:
    """Keeps the tensors of the most recent case only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.key = None
        self.bench = None

    def get(self, case):
        if self.key != case.key:
            self.clear()
            self.bench = prepare(case, self.device)
            self.key = case.key
        return self.bench

    def clear(self) -> None:
        self.key = self.bench = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def case_cache(bench_run):
    cache = _CaseCache(bench_run.device)
    yield cache
    cache.clear()


def _params():
    for case in kernel_cases(PROFILE):
        for pass_ in case.passes:
            for variant in case.variants:
                yield pytest.param(case, variant, pass_, id=f"{case.kernel}-{case.name}-{pass_}-{variant}")


@pytest.mark.parametrize("case,variant,pass_", list(_params()))
def test_kernel(benchmark, bench_run, case_cache, case, variant, pass_):
    if PROFILE == "gpu" and gpu_skip_reason(PROFILE):
        pytest.skip(gpu_skip_reason(PROFILE))
    benchmark.group = f"{case.kernel} {case.name} {pass_}"
    bench = case_cache.get(case)
    timing, check = measure_variant(bench, variant, pass_, PROFILE,
                                    lambda fn, plan: pytest_benchmark_timing(benchmark, fn, plan),
                                    quick=benchmark.disabled)
    if timing is not None:
        entry = bench_run.record_kernel(case, variant, pass_, timing, bench.bytes_moved(pass_), check)
        benchmark.extra_info.update({k: entry[k] for k in ("bytes_moved", "gbps", "copy_fraction")})
