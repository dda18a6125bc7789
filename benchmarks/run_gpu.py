"""Every GPU number of the benchmark suite in one call, without pytest.

    python benchmarks/run_gpu.py                      # kernels, then the end-to-end step
    python benchmarks/run_gpu.py --only kernels       # or: --only e2e
    python benchmarks/run_gpu.py --match ema --layers 4

Measures the ``gpu`` profile (Qwen-Image sizes, see ``kernel_cases.py`` and ``e2e.py``) with the same
cases, checks and round structure as ``pytest benchmarks --benchmark-only`` under
``TWINFLOW_BENCH_SIZE=gpu``, timing each round between two ``torch.cuda.synchronize()`` calls.

Needs torch with CUDA and triton; the end-to-end step also needs diffusers (the reduced-depth model is
built from its configuration: nothing is downloaded). It does not need pytest, DeepSpeed, or an
installed ``twinflow``: the checkout's ``twinflow/`` and ``kernels/`` are imported directly.

Writes: appends the run to ``benchmarks/results/gpu_cuda.json`` and, when ``$OUT`` is set (the device
machine's return folder), copies that file into it. A failing case (an error, out of memory) is
recorded as skipped with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMER = "benchmarks.harness.measure: rounds of back-to-back calls between two torch.cuda.synchronize() readings"


def _import_from_checkout() -> None:
    """Makes ``benchmarks``, ``twinflow`` and ``twinflow.kernels`` (the top-level ``kernels/`` folder,
    which setup.py installs under that name) importable from this checkout."""
    sys.path.insert(0, str(ROOT))
    import twinflow

    try:
        import twinflow.kernels  # noqa: F401  (an installed package, editable or not)
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "twinflow.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["twinflow.kernels"] = module
        spec.loader.exec_module(module)
        twinflow.kernels = module


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_kernels(run, match: str) -> None:
    from benchmarks.harness import measure
    from benchmarks.kernel_cases import kernel_cases, measure_variant, prepare

    timer = lambda fn, plan: measure(fn, run.device, plan)  # noqa: E731
    for case in kernel_cases("gpu"):
        if match not in case.key:
            continue
        try:
            bench = prepare(case, run.device)
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
            run.skip(case.key, f"allocation failed: {_error(e)}")
            _free()
            continue
        for pass_ in case.passes:
            for variant in case.variants:
                try:
                    timing, check = measure_variant(bench, variant, pass_, "gpu", timer)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    run.skip(f"{case.key} {pass_} {variant}", _error(e))
                    continue
                m = run.record_kernel(case, variant, pass_, timing, bench.bytes_moved(pass_), check)
                bw = f", {m['gbps']:.0f} GB/s = {m['copy_fraction']:.1%} of copy" if m["gbps"] else ""
                print(f"{case.key} {pass_} {variant}: {timing.median_s * 1e6:.1f} us{bw} ({check})", flush=True)
        del bench
        _free()


def run_e2e(run, layers: int) -> None:
    from benchmarks.e2e import VARIANTS, e2e_size, measure_step
    from benchmarks.harness import measure

    if importlib.util.find_spec("diffusers") is None:
        run.skip("end-to-end step", "diffusers is not installed on this machine (pip install --no-deps a diffusers wheel)")
        return
    size = e2e_size("gpu", layers)
    print(f"end-to-end: {size.describe()}", flush=True)
    for variant in VARIANTS:
        try:
            result = measure_step(variant, size, run.device, lambda fn, plan: measure(fn, run.device, plan))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            run.skip(f"end-to-end {variant}", _error(e))
            _free()
            continue
        m = run.record_e2e(variant, size.describe(), result["timing"], result["summary"])
        print(f"end-to-end {variant}: {m['images_per_s']:.2f} images/s, peak {m['peak_memory_bytes'] / 2**30:.1f} GiB",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("kernels", "e2e"), help="run one part only")
    parser.add_argument("--match", default="", help="kernel cases whose 'kernel/case' contains this text")
    parser.add_argument("--layers", type=int, default=4, help="double-stream blocks of the end-to-end model")
    parser.add_argument("--env", action="store_true", help="print `twinflow env --json` (versions, import check) and stop")
    args = parser.parse_args(argv)
    if args.env:
        _import_from_checkout()
        from twinflow.env import main as env_main

        return env_main(["--json"])
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, GPU kernels must be compiled", file=sys.stderr)
        return 2
    _import_from_checkout()
    import torch

    from benchmarks.harness import gpu_skip_reason
    from benchmarks.results import BenchRun, summary_lines, write_record

    reason = gpu_skip_reason("gpu")
    if reason is not None:
        print(f"nothing measured: {reason}", file=sys.stderr)
        return 2
    run = BenchRun("gpu", torch.device("cuda"), TIMER)
    print(f"copy bandwidth: {run.copy['gbps']:.0f} GB/s", flush=True)
    if args.only in (None, "kernels"):
        run_kernels(run, args.match)
    if args.only in (None, "e2e"):
        run_e2e(run, args.layers)
    record = run.record()
    path = write_record(record)
    print("\n".join(summary_lines(record)))
    print(f"recorded: {path}")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        print(f"copied to {os.environ['OUT']}/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
