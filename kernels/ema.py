"""Fused multi-tensor EMA update for the teacher weights (ALGORITHM.md §3.5).

Every optimizer step the teacher EMA moves towards the online weights, ``ema <- d*ema + (1-d)*theta``,
with the decay ``d`` given by the caller (``twinflow.method.ema_schedule.EMADecaySchedule`` computes it).
The Triton kernel, one launch per (source dtype, shadow dtype) group whatever the number of tensors, is
in kernels/ema_triton.py; this file holds the numerics, the eager reference and the host path. The first
call with a set of tensors validates them and builds the kernel's chunk tables (a *plan*); later calls
only compare each tensor's data pointer, element count and dtype with the plan's and launch (see
:class:`_Plan` for what that comparison guarantees).

Numerics (shared exactly by the kernel and :func:`ema_update_reference_`):

* The EMA is float32. Sources are float32, bfloat16 or float16 and are widened to float32 exactly.
* The update is torch.lerp's two-sided form with weight ``w = float32(1 - d)``, evaluated in float32
  with every operation rounded separately (the kernel is compiled without FMA contraction)::

      w <  0.5:  ema + w * (src - ema)
      w >= 0.5:  src + (1 - w) * (ema - src)      (1 - w is exact in float32 here)

  Each branch is exact at its end of the interval, so ``d = 1`` keeps the EMA and ``d`` close to 0
  lands close to the source. ``d = 0`` (the schedule's first update) is a plain copy that never reads
  the old EMA, so an uninitialised (``torch.empty``) EMA becomes an exact copy of the source.
* The optional *shadow* (e.g. a bfloat16 copy used for teacher forwards) receives the new EMA rounded
  to its dtype with round-to-nearest-even, i.e. ``ema.to(shadow.dtype)``, in the same pass.

Layout requirements: all tensors contiguous and on one device, ``src[i]`` and ``shadow[i]`` shaped like
``ema[i]``. Non-contiguous sources are rejected (parameters and ZeRO-3 partitions are contiguous; EMA
storage is ours) rather than silently copied every step. Tensors with more than 2**31 elements are
handled (int64 offsets).
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import ema_triton
from ._common import KernelBackendError, check_backend, interpreter_enabled, use_triton
from .ema_triton import CHUNK, DTYPE_CODES, MODE_COPY, MODE_FROM_EMA, MODE_FROM_SRC

__all__ = ["ema_update_", "ema_update_reference_", "MultiTensorEMA"]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# Validation and the update coefficient
# --------------------------------------------------------------------------------------------------
def _as_list(x: Optional[TensorOrList], name: str) -> Optional[list[torch.Tensor]]:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return [x]
    items = list(x)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return items


def _check_decay(decay: float) -> float:
    d = float(decay)
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        raise ValueError(f"EMA decay must be a finite number in [0, 1], got {decay!r}")
    return d


def _check_targets(emas: list[torch.Tensor], shadows: Optional[list[torch.Tensor]]) -> None:
    """Checks the tensors the update writes: float32 contiguous EMAs and matching shadows."""
    for i, e in enumerate(emas):
        if e.dtype != torch.float32:
            raise TypeError(f"ema[{i}] must be float32, got {e.dtype}")
        if not e.is_contiguous():
            raise ValueError(f"ema[{i}] must be contiguous (shape {tuple(e.shape)}, stride {e.stride()})")
        if e.device != emas[0].device:
            raise ValueError(f"ema[{i}] is on {e.device} but ema[0] is on {emas[0].device}")
    if shadows is None:
        return
    if len(shadows) != len(emas):
        raise ValueError(f"shadow list has {len(shadows)} tensors but the ema list has {len(emas)}")
    for i, (e, s) in enumerate(zip(emas, shadows)):
        _check_pair("shadow", i, e, s)


def _check_pair(name: str, i: int, ema: torch.Tensor, t: torch.Tensor) -> None:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if t.shape != ema.shape:
        raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but ema[{i}] has shape {tuple(ema.shape)}")
    if t.device != ema.device:
        raise ValueError(f"{name}[{i}] is on {t.device} but ema[{i}] is on {ema.device}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name}[{i}] must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            "pass .contiguous() explicitly"
        )


def _check_sources(emas: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    if len(srcs) != len(emas):
        raise ValueError(f"src list has {len(srcs)} tensors but the ema list has {len(emas)}")
    for i, (e, s) in enumerate(zip(emas, srcs)):
        _check_pair("src", i, e, s)


@dataclass(frozen=True)
class _Coefficient:
    """The kernel mode and float32 coefficient for one decay (see the module docstring)."""

    mode: int
    coef: float  # a float32-representable value


def _round_to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), for ``0 <= x <= 1``, in plain Python
    arithmetic: no tensor and no ``.item()``, so ``torch.compile`` traces it without a graph break and
    the host path allocates nothing. ``frexp`` gives ``x = m 2**e`` with ``m`` in [0.5, 1); ``m 2**24``
    is exact in float64 and ``round`` rounds it half to even, i.e. to float32's 24-bit significand.
    Below 2**-126 float32 is subnormal: a multiple of 2**-149, rounded the same way."""
    if x == 0.0:
        return 0.0
    m, e = math.frexp(x)
    if e - 1 < -126:
        return round(x * 2.0**149) * 2.0**-149
    return math.ldexp(round(m * 16777216.0), e - 24)


def _coefficient(decay: float) -> _Coefficient:
    if decay == 0.0:
        return _Coefficient(MODE_COPY, 1.0)
    w = _round_to_float32(1.0 - decay)
    if w < 0.5:
        return _Coefficient(MODE_FROM_EMA, w)
    return _Coefficient(MODE_FROM_SRC, 1.0 - w)  # exact: w in [0.5, 1]


def _ema_update_triton(
    emas: list[torch.Tensor],
    srcs: list[torch.Tensor],
    shadows: Optional[list[torch.Tensor]],
    decay: float,
    *,
    element_range: Optional[tuple[int, int]] = None,
    chunk: int = CHUNK,
) -> None:
    """Triton path on validated inputs. ``element_range`` restricts every tensor to ``[lo, hi)``
    (used to test offsets past 2**31 without touching the whole tensor)."""
    if not emas:
        return
    _launch_groups(ema_triton.build_groups(emas, srcs, shadows, element_range, chunk), emas[0].device, decay)


def _launch_groups(groups: list[ema_triton.Group], device: torch.device, decay: float) -> None:
    coefficient = _coefficient(decay)
    ema_triton.launch_groups(groups, device, mode=coefficient.mode, coef=coefficient.coef)


# --------------------------------------------------------------------------------------------------
# Validated plans: what an update needs that depends only on the tensors, built once
# --------------------------------------------------------------------------------------------------
_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_DTYPE = operator.attrgetter("dtype")


def _fingerprint(*lists: Optional[list]) -> Optional[tuple]:
    """The device of the first tensor of the first list, then per list: every tensor's data pointer,
    element count and dtype, each as one list built by a C-level ``map`` (about 0.1 us per tensor and
    property). None when an item is not a tensor."""
    try:
        device = lists[0][0].device if lists[0] else None
        return (device,) + tuple(None if x is None else (list(map(_PTR, x)), list(map(_NUMEL, x)), list(map(_DTYPE, x)))
                                 for x in lists)
    except (TypeError, AttributeError):
        return None


class _Plan:
    """One validated (ema, src, shadow, backend) combination: the chunk tables (Triton) or the choice of
    the reference, and the fingerprint of the tensors it was built from.

    Everything the plan holds is a function of the fingerprinted properties (data pointers, element
    counts, dtypes) plus shapes, contiguity and devices, which the full validation checked when the
    plan was built. A call whose tensors have the same fingerprint would therefore build the same
    tables, so reusing them cannot launch on stale addresses: a tensor whose storage was replaced
    (``p.data = ...``, ``.to()``, a reallocating ``resize_``, re-partitioning), resized or re-typed
    shows a different pointer, count or dtype, and the call validates and builds again (the cost of
    a first call). The first EMA's device is compared too (pointers of different devices live in
    different address spaces). Not detected, because the table does not depend on it: a new shape of
    the same element count on the same memory, e.g. ``p.data = p.data.view(other_shape)`` (the flat
    update is then the same). Not detected either: a non-contiguous view swapped in at the same address
    (an unsupported input), or one tensor of the list moved to another device at an address equal to
    its old one.
    """

    __slots__ = ("key", "fingerprint", "run_triton", "groups", "device")

    def __init__(self, key: tuple, fingerprint: tuple, run_triton: bool, groups: list[ema_triton.Group],
                 device: Optional[torch.device]):
        self.key, self.fingerprint, self.run_triton, self.groups, self.device = (
            key, fingerprint, run_triton, groups, device)


def _plan_key(n: int, backend: str) -> tuple:
    # The interpreter flag is part of the key: "auto" decides on it (see _common.use_triton).
    return (n, backend, interpreter_enabled())


def _build_plan(emas: list, srcs: list, shadows: Optional[list], backend: str) -> _Plan:
    """Full validation of every tensor, then the backend decision and the chunk tables."""
    for name, items in (("ema", emas), ("src", srcs), ("shadow", shadows)):
        _as_list(items, name)  # names an item that is not a tensor
    _check_targets(emas, shadows)
    _check_sources(emas, srcs)
    run_triton = _run_triton(emas, backend) if emas else False
    groups = ema_triton.build_groups(emas, srcs, shadows, None, CHUNK) if run_triton else []
    return _Plan(_plan_key(len(emas), backend), _fingerprint(emas, srcs, shadows), run_triton, groups,
                 emas[0].device if emas else None)


def _run_plan(plan: _Plan, emas, srcs, shadows, decay: float) -> None:
    if plan.run_triton:
        _launch_groups(plan.groups, plan.device, decay)
    elif emas:
        _ema_update_eager(emas, srcs, shadows, decay)


_PLAN_CACHE_SIZE = 8
_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _cached_plan(emas: list, srcs: list, shadows: Optional[list], backend: str) -> _Plan:
    """The plan of :func:`ema_update_`: looked up by (list length, backend, first EMA address), reused
    only when the whole fingerprint matches, otherwise validated and built (which raises on bad
    inputs). At most ``_PLAN_CACHE_SIZE`` plans (tables of int64 rows, no tensor references)."""
    lookup = (_plan_key(len(emas), backend), _PTR(emas[0]) if emas and isinstance(emas[0], torch.Tensor) else 0)
    plan = _plans.get(lookup)
    if plan is not None and plan.fingerprint == _fingerprint(emas, srcs, shadows):
        _plans.move_to_end(lookup)
        return plan
    plan = _build_plan(emas, srcs, shadows, backend)
    _plans[lookup] = plan
    _plans.move_to_end(lookup)
    if len(_plans) > _PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


@torch.no_grad()
def _ema_update_eager(
    emas: list[torch.Tensor],
    srcs: list[torch.Tensor],
    shadows: Optional[list[torch.Tensor]],
    decay: float,
) -> None:
    coefficient = _coefficient(decay)
    for i, (e, s) in enumerate(zip(emas, srcs)):
        src = s.float()
        if coefficient.mode == MODE_COPY:
            e.copy_(src)
        elif coefficient.mode == MODE_FROM_EMA:
            e.add_((src - e).mul_(coefficient.coef))
        else:
            e.copy_(src + (e - src).mul_(coefficient.coef))
        if shadows is not None:
            shadows[i].copy_(e)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def ema_update_reference_(
    ema_list: Sequence[torch.Tensor],
    src_list: Sequence[torch.Tensor],
    decay: float,
    shadow_list: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """Eager PyTorch reference: ``ema[i] <- decay*ema[i] + (1-decay)*src[i]`` in place, with the
    rounding described in the module docstring, and ``shadow[i] <- ema[i].to(shadow[i].dtype)``."""
    emas, srcs, shadows = _as_list(ema_list, "ema"), _as_list(src_list, "src"), _as_list(shadow_list, "shadow")
    d = _check_decay(decay)
    _check_targets(emas, shadows)
    _check_sources(emas, srcs)
    _ema_update_eager(emas, srcs, shadows, d)


def ema_update_(
    ema: TensorOrList,
    src: TensorOrList,
    decay: float,
    *,
    shadow: Optional[TensorOrList] = None,
    backend: str = "auto",
) -> None:
    """In-place EMA update of one tensor or a list of tensors (see the module docstring).

    ``ema``: float32, contiguous. ``src``: float32/bfloat16/float16, same shapes. ``shadow``: optional
    low-precision copies of the new EMA, same shapes. ``backend``: "auto", "triton" or "eager"
    (:func:`twinflow.kernels._common.use_triton`). A single flat ZeRO-3 partition is a list of one.

    Host cost: the first call with a set of tensors validates them all and builds the chunk tables;
    later calls with the same tensors (same data pointers, element counts and dtypes: see
    :class:`_Plan`) compare those properties and launch: about 1 us per (ema, src, shadow) triple on
    the host (a loaded 2-core machine, BENCHMARKS.md), against 2-4 us with the full validation.
    """
    d = _check_decay(decay)
    check_backend(backend)  # before any tensor: an empty list must not hide a misspelt backend
    emas, srcs, shadows = _items(ema), _items(src), _items(shadow)
    _run_plan(_cached_plan(emas, srcs, shadows, backend), emas, srcs, shadows, d)


def _items(x: Optional[TensorOrList]) -> Optional[list]:
    """A tensor or a sequence as a new list, unchecked (the plan's validation names bad items)."""
    if x is None:
        return None
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _run_triton(emas: list[torch.Tensor], backend: str) -> bool:
    """Whether the Triton kernel runs on ``emas`` (validated, non-empty) with ``backend``."""
    run_triton = use_triton(emas[0], backend=backend)
    if run_triton and emas[0].device.type != "cpu" and interpreter_enabled():
        # The interpreter runs on host copies of tensor arguments; the chunk table's raw device
        # addresses would be dereferenced on the host.
        if backend == "triton":
            raise KernelBackendError(
                "backend='triton' cannot run the EMA kernel on CUDA tensors under TRITON_INTERPRET=1 "
                "(its address table holds device pointers); unset TRITON_INTERPRET"
            )
        run_triton = False
    return run_triton


class MultiTensorEMA:
    """A float32 EMA over a fixed list of tensors, with the plan (validation, chunk tables) held here.

    The EMA (and optional shadow) tensors are owned by the caller, e.g. fp32 shards beside a ZeRO-3
    partition or a LoRA adapter's averaged weights; :meth:`update` is called once per optimizer step
    with the current online tensors and the decay (the caller's schedule owns the decay sequence).
    """

    def __init__(
        self,
        ema_tensors: Sequence[torch.Tensor],
        shadow_tensors: Optional[Sequence[torch.Tensor]] = None,
        backend: str = "auto",
    ):
        self.ema_tensors = _as_list(ema_tensors, "ema")
        self.shadow_tensors = _as_list(shadow_tensors, "shadow")
        _check_targets(self.ema_tensors, self.shadow_tensors)
        check_backend(backend)  # before any tensor: an empty list must not hide a misspelt backend
        self.backend = backend
        self._plan: Optional[_Plan] = None

    @torch.no_grad()
    def update(self, src_tensors: TensorOrList, decay: float) -> None:
        """Applies one EMA step with ``decay`` towards ``src_tensors``. Every input is checked before
        anything is written, so a rejected call leaves the EMA unchanged (and a caller that advances
        its schedule after this call, its schedule too).

        The first call validates every tensor and builds the plan (chunk tables); later calls compare
        the fingerprint of the EMA, source and shadow tensors with the plan's (see :class:`_Plan`) and
        launch, rebuilding only when a tensor changed."""
        d = _check_decay(decay)
        srcs = _items(src_tensors)
        plan = self._plan
        if plan is None or plan.key != _plan_key(len(self.ema_tensors), self.backend) or \
                plan.fingerprint != _fingerprint(self.ema_tensors, srcs, self.shadow_tensors):
            plan = self._plan = None
            plan = self._plan = _build_plan(self.ema_tensors, srcs, self.shadow_tensors, self.backend)
        _run_plan(plan, self.ema_tensors, srcs, self.shadow_tensors, d)
