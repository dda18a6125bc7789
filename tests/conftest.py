"""Suite-wide setup.

Without a CUDA GPU, Triton kernels run through Triton's CPU interpreter, which is chosen when a kernel
is created; setting TRITON_INTERPRET here, before any test module imports triton or
``twinflow.kernels``, makes that independent of which test folder pytest collects first. With
``kernels: auto`` the objective, the EMA and the time embedding then run their Triton paths in tests, as
they would on a GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
