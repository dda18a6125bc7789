"""Benchmark suite: fused kernels against eager and ``torch.compile`` baselines, and the end-to-end
TwinFlow training step against an eager baseline built the way the reference code runs it.

A package (not loose files) so that the pytest modules and ``run_gpu.py`` import the same helpers as
``benchmarks.<module>`` and no helper name can clash with a module under ``tests/``. See BENCHMARKS.md
at the repository root for how to run it and for the measured numbers.
"""
