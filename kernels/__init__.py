"""Fused Triton kernels, each beside its eager reference. Installed as ``twinflow.kernels``."""
