"""End-to-end benchmark: one TwinFlow training step (objective, backward, AdamW, EMA update) of our
implementation against the eager baseline, on a Qwen-Image-architecture model (see ``e2e.py``).

GPU profile: real width (3072, 24 heads x 128, text width 3584), 1024 image tokens (512 px), with
``TWINFLOW_BENCH_E2E_LAYERS`` blocks (default 4). Smoke profile: the tiny 2-block model on CPU.
"""
from __future__ import annotations

import os

import pytest

from .e2e import VARIANTS, e2e_size, measure_step
from .harness import active_profile, gpu_skip_reason, pytest_benchmark_timing, synchronized_timer

PROFILE = active_profile()
LAYERS_ENV = "TWINFLOW_BENCH_E2E_LAYERS"
pytestmark = pytest.mark.benchmark(timer=synchronized_timer)


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e_step(benchmark, bench_run, variant):
    if PROFILE == "gpu" and gpu_skip_reason(PROFILE):
        pytest.skip(gpu_skip_reason(PROFILE))
    size = e2e_size(PROFILE, int(os.environ.get(LAYERS_ENV, "4")))
    benchmark.group = "e2e training step"
    result = measure_step(variant, size, bench_run.device,
                          lambda fn, plan: pytest_benchmark_timing(benchmark, fn, plan),
                          warmup=not benchmark.disabled)
    if result is not None:
        entry = bench_run.record_e2e(variant, size.describe(), result["timing"], result["summary"])
        benchmark.extra_info.update({k: entry[k] for k in ("images_per_s", "peak_memory_bytes", "main_pass_mfu")})
