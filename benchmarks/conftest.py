"""pytest set-up of the benchmark suite.

* Without a CUDA GPU the fused kernels can only run in Triton's interpreter, which ``triton.jit`` picks
  when it decorates a kernel: ``TRITON_INTERPRET=1`` is set here, before anything imports Triton or
  ``twinflow.kernels`` (as ``tests/kernels/conftest.py`` does).
* ``bench_run`` (session, used by every benchmark test): collects every measurement; at the end of the
  session the terminal summary prints them, the targets and the GPU measurements that were skipped (and
  why), and ``TWINFLOW_BENCH_RECORD=1`` appends the run to ``benchmarks/results/`` as JSON.
* On CPU the benchmarks run with one intra-op thread and inductor compiles in-process (both restored
  afterwards, so ``pytest tests benchmarks`` leaves the tests alone). The CPU machines are shared, and
  inductor's OpenMP kernels then wait on descheduled threads: the compiled smoke loss took 36-76 ms a
  call with 2 threads and ~0.1 ms with 1 (2-core machine, load average ~6), which says nothing about
  the code. Starting inductor's compile worker pool doubled the smoke run's time (39 s -> 80 s, cold
  compile cache, same load).
* ``TWINFLOW_BENCH_SIZE=gpu`` selects the Qwen-Image sizes (see ``harness.py``).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from .harness import active_profile, bench_device  # noqa: E402
from .results import BenchRun, skip_gpu_measurements, summary_lines, write_record  # noqa: E402

RECORD_ENV = "TWINFLOW_BENCH_RECORD"
TIMER = "pytest-benchmark pedantic rounds, timer = perf_counter read after torch.cuda.synchronize()"
_RUN: list[BenchRun] = []


@pytest.fixture(scope="session", autouse=True)
def bench_run():
    import torch._inductor.config as inductor_config

    device = bench_device()
    threads, compile_threads = torch.get_num_threads(), inductor_config.compile_threads
    if device.type == "cpu":
        torch.set_num_threads(1)
        inductor_config.compile_threads = 1
    run = BenchRun(active_profile(), device, TIMER)
    skip_gpu_measurements(run)
    _RUN.append(run)
    yield run
    torch.set_num_threads(threads)
    inductor_config.compile_threads = compile_threads


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _RUN:
        return
    run = _RUN[0]
    terminalreporter.section("TwinFlow benchmarks")
    if not run.measurements:
        terminalreporter.write_line("nothing was timed (benchmarks disabled or skipped): the bodies ran once as tests")
    record = run.record()
    for line in summary_lines(record):
        terminalreporter.write_line(line)
    if os.environ.get(RECORD_ENV) == "1" and run.measurements:
        terminalreporter.write_line(f"recorded: {write_record(record)}")
