"""Qwen-Image backbone tests. Without a GPU, Triton runs only through its interpreter, which must be
selected before ``triton`` is first imported (see ``twinflow.kernels._common``); this conftest loads
before any test module here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
