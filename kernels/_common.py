"""What every kernel module in ``twinflow.kernels`` shares: backend selection, launch helpers (grid
arithmetic, block sizes, the device context) and the one way kernels are set up (:func:`jit_kernels`).
Nothing in ``kernels/`` imports ``twinflow``: callers pass plain scalars and tensors.

Each fused kernel has an eager PyTorch reference (beside it, or in ``twinflow.method`` for the loss);
callers pick one with a ``backend`` string:

* ``"eager"``: always the reference (plain torch ops).
* ``"triton"``: always the Triton kernel; raises :class:`KernelBackendError` naming the reason when it
  cannot run (Triton missing, CPU tensors without the interpreter, tensors on mixed devices).
* ``"auto"``: Triton for CUDA tensors, and for CPU tensors only when Triton's interpreter is on
  (``TRITON_INTERPRET=1``); the reference otherwise.

Why the interpreter rule: on a machine without a GPU, Triton can only execute kernels through its
interpreter, which is selected when ``triton.jit`` decorates a function. Every module decorates its
kernels on first use (:func:`jit_kernels`, keyed on :func:`interpreter_enabled`), so
``TRITON_INTERPRET=1`` only needs to be set before the first call.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import types
from contextlib import nullcontext

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


def block_size(n: int, cap: int) -> int:
    """A tile or block size covering ``n``: a power of two, at least 16 (the smallest ``tl.dot``
    operand) and at most ``cap``."""
    return max(16, min(cap, next_power_of_2(n)))


def device_context(device: torch.device):
    """Makes ``device`` the current CUDA device for a launch (Triton launches on the current device, which
    need not be the tensors'); a no-op context elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def check_backend(backend: str) -> None:
    """Rejects a ``backend`` that is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")


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
    check_backend(backend)
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


# --------------------------------------------------------------------------------------------------
# The one place where interpreted and compiled kernels differ
#
# Kernel bodies are plain functions turned into kernels on first use by :func:`jit_kernels` (Triton
# picks compiled or interpreted mode when ``triton.jit`` runs, so decorating lazily makes
# TRITON_INTERPRET matter at the first call rather than at import). They call ``_cast``, ``_dot``,
# ``_sin``, ``_cos``, ``_tan``, ``_pow``; ``jit_kernels`` binds each name to the ``*_gpu`` version
# below or to its ``*_interpreted`` substitute. Each
# substitute exists because Triton's CPU interpreter (checked with Triton 3.9.0) cannot run the GPU
# code correctly:
#
# * ``cast``: the interpreter's fp32 -> bf16 conversion truncates (with or without
#   ``fp_downcast_rounding="rtne"``); the substitute rounds to nearest even with integer ops
#   (``_bf16_bits``), which is what the GPU's native conversion does.
# * ``dot``: the interpreter multiplies bf16 ``tl.dot`` operands as raw integers (errors ~1e10 on
#   N(0,1) data); the substitute widens the operands to float32 first, which is exact (a bf16 x bf16
#   product fits in float32's significand) and accumulates in float32 like the GPU's tensor cores.
# * ``sin``, ``cos``, ``tan``, ``pow``: ``libdevice`` does not exist under the interpreter. On GPUs
#   libdevice is the CUDA math library torch's own CUDA sin/cos/tan/pow call (bitwise equal results,
#   checked by the cuda tests); ``tl.sin``/``tl.cos`` would compile to the approximate sin.approx.f32.
#   The substitutes are numpy's float32 functions (within 1-2 ulp of torch's CPU ones); ``tan`` is
#   sin / cos and ``pow(x, p)`` is ``exp2(p log2 x)``, both within a few ulp.
#
# ``_bf16_bits`` is the same in both modes: the integer rounding itself, also called directly by the EMA
# kernel, which stores bfloat16 as raw bits on every backend (see kernels/ema.py).
#
# Division needs no helper: ``tl.math.div_rn`` (IEEE round-to-nearest division, in Triton 3.6 and 3.9)
# runs in both modes. The bare ``/`` compiles to the approximate ``div.full.f32`` on GPUs (up to 2 ulp),
# so kernels that claim torch's roundings divide with ``div_rn``.
# --------------------------------------------------------------------------------------------------
def bf16_bits(x):
    """The 16 bits of the bfloat16 nearest to float32 ``x`` (ties to even), with integer ops; NaN gives
    the quiet NaN 0x7FC0, as torch's conversion does (the carry of the rounding could turn a NaN with
    a full payload into -0)."""
    bits = x.to(tl.uint32, bitcast=True)  # noqa: F821
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)  # noqa: F821


def cast_gpu(x, ty: tl.constexpr):  # noqa: F821 - ``tl`` is bound by jit_kernels
    """Round ``x`` to ``ty`` (round to nearest even)."""
    return x.to(ty)


def dot_gpu(a, b, acc):
    """``acc + a @ b`` with float32 accumulation; IEEE float32 products (never TF32) for fp32 inputs."""
    return tl.dot(a, b, acc, input_precision="ieee")  # noqa: F821


def sin_gpu(x):
    return libdevice.sin(x)  # noqa: F821


def cos_gpu(x):
    return libdevice.cos(x)  # noqa: F821


def tan_gpu(x):
    return libdevice.tan(x)  # noqa: F821


def pow_gpu(x, p):
    return libdevice.pow(x, p)  # noqa: F821


def cast_interpreted(x, ty: tl.constexpr):  # noqa: F821
    if ty == tl.bfloat16:  # noqa: F821
        return _bf16_bits(x.to(tl.float32)).to(tl.bfloat16, bitcast=True)  # noqa: F821
    return x.to(ty)


def dot_interpreted(a, b, acc):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")  # noqa: F821


def sin_interpreted(x):
    return tl.sin(x)  # noqa: F821


def cos_interpreted(x):
    return tl.cos(x)  # noqa: F821


def tan_interpreted(x):
    return tl.sin(x) / tl.cos(x)  # noqa: F821


def pow_interpreted(x, p):
    return tl.exp2(p * tl.log2(x))  # noqa: F821


SHARED = ("bf16_bits",)
"""Helpers with one version for both modes."""
HELPERS = ("cast", "dot", "sin", "cos", "tan", "pow")
"""Helpers with a GPU version and an interpreter substitute."""


def jit_kernels(bodies, interpreted: bool, module_globals: dict, device_functions=()) -> list:
    """``triton.jit`` of each body in ``bodies``, re-created over a copy of ``module_globals`` in which
    the names of :data:`SHARED` and :data:`HELPERS` with a leading underscore (``_bf16_bits``, ``_cast``,
    ``_dot``, ...) are bound to jitted helpers: for :data:`HELPERS`, the GPU versions (``interpreted``
    False) or their interpreter substitutes (True). ``device_functions`` are the module's own
    ``@triton.jit``-style helpers, jitted over the same names and bound there under their own names, so
    bodies and helpers call each other as usual. ``interpreted`` must equal TRITON_INTERPRET at the time
    of the call (triton.jit reads it).

    This is the one way every kernel module sets up its kernels: decorating on first use (each module
    caches the result per mode) rather than at import makes TRITON_INTERPRET matter at the first call,
    so importing a kernel module early cannot freeze the mode."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    here = {"tl": tl, "libdevice": libdevice, "__name__": __name__}
    for name in SHARED:
        here["_" + name] = triton.jit(_rebind(globals()[name], here))
    suffix = "_interpreted" if interpreted else "_gpu"
    namespace = dict(module_globals)
    namespace.update({"_" + name: here["_" + name] for name in SHARED})
    for name in HELPERS:
        namespace["_" + name] = triton.jit(_rebind(globals()[name + suffix], here))
    for fn in device_functions:
        namespace[fn.__name__] = triton.jit(_rebind(fn, namespace))
    return [triton.jit(_rebind(body, namespace)) for body in bodies]


def _rebind(fn, namespace: dict):
    """``fn`` over other globals, with its annotations: triton.jit reads ``tl.constexpr`` from them, and a
    copy without them compiles in the interpreter but fails at its first GPU launch ("arange's arguments
    must be of type tl.constexpr"), as the first H200 run of these kernels showed."""
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy
