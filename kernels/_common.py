"""Backend selection shared by every kernel module in ``twinflow.kernels``.

Each fused kernel ships beside an eager PyTorch reference; callers pick one with a ``backend`` string:

* ``"eager"``: always the reference (plain torch ops).
* ``"triton"``: always the Triton kernel; raises :class:`KernelBackendError` naming the reason when it
  cannot run (Triton missing, CPU tensors without the interpreter, tensors on mixed devices).
* ``"auto"``: Triton for CUDA tensors, and for CPU tensors only when Triton's interpreter is on
  (``TRITON_INTERPRET=1``); the reference otherwise.

Why the interpreter rule: on a machine without a GPU, Triton can only execute kernels through its
interpreter, which is selected when ``triton.jit`` decorates a function. For a module that decorates
its kernels at import, ``TRITON_INTERPRET=1`` must be set before that import (setting it later leaves
compiled-mode kernels that cannot run on CPU tensors); a module that decorates on first use (keyed on
:func:`interpreter_enabled`) only needs it set before the first call.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "eager", "auto")


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run on the given inputs."""


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is requested through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """Whether the ``triton`` distribution can be imported (without importing it). Cached: the answer
    cannot change within a process that has imported a kernel module, and ``find_spec`` walks
    ``sys.path`` (tens of microseconds per kernel call otherwise)."""
    return importlib.util.find_spec("triton") is not None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. ``triton.cdiv`` is a ``constexpr_function`` in Triton 3.9,
    whose Python call costs ~5 us (argument unwrapping); launchers call this instead."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2`` but a plain
    function (see :func:`cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _device_type(tensors: tuple[torch.Tensor, ...]) -> str:
    """The single device type shared by ``tensors``; a clear error when they disagree."""
    types = {t.device.type for t in tensors if t is not None}
    if len(types) > 1:
        raise KernelBackendError(f"kernel inputs are on mixed devices: {sorted(types)}")
    if not types:
        raise KernelBackendError("use_triton needs at least one tensor to decide the device")
    return types.pop()


def use_triton(*tensors: torch.Tensor, backend: str) -> bool:
    """Decide whether the Triton kernel (True) or the eager reference (False) runs on ``tensors``.

    ``backend`` is ``"triton"``, ``"eager"`` or ``"auto"`` (see the module docstring). ``None``
    entries in ``tensors`` are ignored (optional inputs such as a missing bias).
    """
    if backend not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "eager":
        return False
    device = _device_type(tensors)
    reason = None
    if not triton_installed():
        reason = "the 'triton' package is not installed"
    elif device == "cpu" and not interpreter_enabled():
        reason = ("the inputs are CPU tensors and Triton's interpreter is off "
                  "(set TRITON_INTERPRET=1 before importing triton / twinflow.kernels)")
    elif device not in ("cpu", "cuda"):
        reason = f"Triton kernels do not support device type {device!r}"
    if reason is None:
        return True
    if backend == "triton":
        raise KernelBackendError(f"backend='triton' cannot run: {reason}")
    return False
