"""Host (Python) microseconds per kernel call, with the Triton launch replaced by a no-op.

    python benchmarks/host_overhead.py [--calls 2000] [--json PATH]

What runs: the public entry points (``ema_update_``, ``MultiTensorEMA.update``, ``dual_time_embedding``,
``DualTimestepEmbedding``) on CPU tensors, with every jitted kernel object swapped for a stub whose
``kernel[grid](...)`` does nothing. So the time is exactly the Python a call spends before (and around)
its launches: argument checks, cache look-ups, output allocation, grid arithmetic, the launch call's
own argument binding is *not* included (that part is Triton's and the same before and after).
Tensor sizes do not matter (nothing is computed); the tensor *counts* are the real ones: 1440 tensors
is the rank-32 LoRA adapter of the 60-block Qwen-Image backbone (``kernel_cases.lora_shapes``), here
with rank 4 and width 64 so that three lists fit in a few MB.

Each number is the median over 7 repeats of the mean over ``--calls`` calls (after 20 warm calls).
The script only needs the checkout on ``sys.path``; it sets ``TRITON_INTERPRET=1`` so that CPU tensors
pass the backend checks (no kernel is interpreted: they are stubbed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a ``triton.JITFunction``: ``stub[grid](*args, **kwargs)`` returns at once."""

    calls = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _NoLaunch.calls += 1


def _stub_kernels() -> None:
    import twinflow.kernels.dual_time_embedding_triton as dte
    import twinflow.kernels.ema_triton as ema

    ema._kernels = lambda interpreted: ema._Kernels(_NoLaunch())
    stubs = dte._Kernels(*(_NoLaunch() for _ in dte._Kernels._fields))
    dte._kernels = lambda interpreted: stubs


def _per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def cases():
    from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings

    from benchmarks.kernel_cases import lora_shapes
    from twinflow.kernels.dual_time_embedding import DualTimestepEmbedding, dual_time_embedding
    from twinflow.kernels.ema import MultiTensorEMA, ema_update_

    out = {}
    for count, shapes in (("1440", lora_shapes(64, 4, 60)), ("1", [(1000,)])):
        assert len(shapes) == int(count)
        src = [torch.randn(s) for s in shapes]
        ema = [torch.randn(s) for s in shapes]
        shadow = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
        out[f"ema_update_ ({count} tensors, bf16 shadow)"] = (
            lambda e=ema, s=src, sh=shadow: ema_update_(e, s, 0.99, shadow=sh, backend="triton"), 1)
        averager = MultiTensorEMA(ema, shadow_tensors=shadow, backend="triton")
        out[f"MultiTensorEMA.update ({count} tensors, bf16 shadow)"] = (lambda a=averager, s=src: a.update(s, decay=0.99), 1)

    torch.manual_seed(0)
    e1, e2 = QwenTimestepProjEmbeddings(64), QwenTimestepProjEmbeddings(64)
    e1, e2 = e1.to(torch.bfloat16), e2.to(torch.bfloat16)
    t = torch.rand(4)
    tt = t * 0.5
    module = DualTimestepEmbedding(e1, e2, backend="triton")

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    out["dual_time_embedding fwd, no grad (B=4)"] = (
        no_grad(lambda: dual_time_embedding(t, tt, e1, e2, torch.bfloat16, backend="triton")), 3)
    out["DualTimestepEmbedding fwd, no grad (B=4)"] = (no_grad(lambda: module(t, tt, torch.bfloat16)), 3)
    out["dual_time_embedding fwd, weights require grad (B=4)"] = (
        lambda: dual_time_embedding(t, tt, e1, e2, torch.bfloat16, backend="triton"), 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _stub_kernels()
    import triton

    results = {}
    for name, (fn, launches) in cases().items():
        _NoLaunch.calls = 0
        fn()
        if _NoLaunch.calls != launches:
            raise SystemExit(f"{name}: expected {launches} stubbed launches per call, saw {_NoLaunch.calls}")
        results[name] = _per_call_us(fn, max(50, args.calls // (100 if "1440" in name else 1)))
        print(f"{name:55s} {results[name]:9.1f} us/call", flush=True)
    meta = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
            "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "us_per_call": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
