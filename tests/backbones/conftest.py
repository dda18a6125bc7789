"""Qwen-Image backbone tests. Triton's CPU interpreter must be selected before ``triton`` is first
imported (see ``twinflow.kernels._common``); this conftest loads before any test module here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
