"""Fused multi-tensor EMA update for the teacher weights (ALGORITHM.md §3.5).

Every optimizer step the teacher EMA moves towards the online weights, ``ema <- d*ema + (1-d)*theta``,
with ``d`` from :class:`twinflow.method.ema_schedule.EMADecaySchedule`. A model has hundreds to
thousands of parameter tensors (or, under ZeRO-3, one large flat shard per rank); one kernel launch per
tensor would make this memory-bound update launch-bound. The Triton kernel here instead walks a
device-side *chunk table*: one row per chunk of at most ``CHUNK`` elements, holding the int64 base
addresses of the EMA, source and shadow tensors and the chunk's ``[start, stop)`` element range. One
program handles one row, so an update costs one launch per (source dtype, shadow dtype) group,
independent of the number of tensors. The first call with a set of tensors validates them and builds
the tables (a *plan*); later calls only compare each tensor's data pointer, element count and dtype
with the plan's and launch (see :class:`_Plan` for what that comparison guarantees).

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
  to its dtype with round-to-nearest-even, i.e. ``ema.to(shadow.dtype)``, in the same pass. bfloat16
  is converted with integer bit operations because Triton's CPU interpreter truncates (and mishandles
  subnormals) in its native bfloat16 casts; the bit form is exact on every backend.

Layout requirements: all tensors contiguous and on one device, ``src[i]`` and ``shadow[i]`` shaped like
``ema[i]``. Non-contiguous sources are rejected (parameters and ZeRO-3 partitions are contiguous; EMA
storage is ours) rather than silently copied every step. All element offsets are int64, so tensors
with more than 2**31 elements are handled.
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from twinflow.method.ema_schedule import EMADecaySchedule

from ._common import BACKENDS, KernelBackendError, interpreter_enabled, use_triton

__all__ = ["ema_update_", "ema_update_reference_", "MultiTensorEMA"]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

BLOCK = 1024
"""Elements one program processes per loop iteration."""
CHUNK = 64 * BLOCK
"""Elements per chunk-table row (one program): large enough to amortise a program's start-up, small
enough that a single big shard still spreads over many programs."""

# dtype codes understood by the kernel (constexpr), and the update modes.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NO_SHADOW = -1
_MODE_COPY = 0  # d == 0: ema = src
_MODE_FROM_EMA = 1  # w < 0.5: ema + w * (src - ema)
_MODE_FROM_SRC = 2  # w >= 0.5: src + (1 - w) * (ema - src)
_ALIGN_BYTES = 16


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _typed_pointer(addr, KIND: tl.constexpr):
    """Turns an int64 address into a pointer for dtype code ``KIND`` (bfloat16 is read as raw bits).
    A missing shadow (``KIND`` -1, address 0) gets a pointer that is never dereferenced."""
    if KIND == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float16))
    return ptr


@triton.jit
def _to_f32(val, KIND: tl.constexpr):
    """Widens loaded ``KIND`` elements to float32 exactly (bfloat16 bits shifted into place)."""
    if KIND == 1:
        val = (val.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return val.to(tl.float32)


@triton.jit
def _from_f32(val, KIND: tl.constexpr):
    """Narrows float32 to ``KIND`` with round-to-nearest-even; bfloat16 as raw bits, NaN kept quiet."""
    if KIND == 1:
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(val != val, 0x7FC0, rounded).to(tl.uint16)
    elif KIND == 2:
        out = val.to(tl.float16)
    else:
        out = val
    return out


@triton.jit
def _ema_block(ema, src, shadow, offs, mask, coef, SRC_KIND: tl.constexpr, SHADOW_KIND: tl.constexpr,
               MODE: tl.constexpr):
    """Updates the elements at ``offs``; ``mask`` is None for a full block (lets loads vectorise)."""
    new = _to_f32(tl.load(src + offs, mask=mask), SRC_KIND)
    if MODE == 1:
        old = tl.load(ema + offs, mask=mask)
        new = old + coef * (new - old)
    elif MODE == 2:
        old = tl.load(ema + offs, mask=mask)
        new = new + coef * (old - new)
    tl.store(ema + offs, new, mask=mask)
    if SHADOW_KIND >= 0:
        tl.store(shadow + offs, _from_f32(new, SHADOW_KIND), mask=mask)


@triton.jit
def _ema_chunk_table_kernel(
    table_ptr,
    coef,
    SRC_KIND: tl.constexpr,
    SHADOW_KIND: tl.constexpr,
    MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program updates one chunk-table row ``(ema_addr, src_addr, shadow_addr, start, stop)``.

    ``MODE`` 0 copies the source, 1 computes ``ema + coef*(src - ema)``, 2 ``src + coef*(ema - src)``.
    """
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    ema = tl.load(row).to(tl.pointer_type(tl.float32))
    src = _typed_pointer(tl.load(row + 1), SRC_KIND)
    shadow = _typed_pointer(tl.load(row + 2), SHADOW_KIND)
    start = tl.load(row + 3)
    stop = tl.load(row + 4)
    if ALIGNED:
        # The host checked that every address is 16-byte aligned and every chunk starts at a multiple
        # of 16 elements; with unmasked full blocks this lets the compiler emit vector accesses.
        ema = tl.multiple_of(ema, 16)
        src = tl.multiple_of(src, 16)
        shadow = tl.multiple_of(shadow, 16)
        start = tl.multiple_of(start, 16)
    n_full = (stop - start) // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)  # int64: start is int64
        _ema_block(ema, src, shadow, offs, None, coef, SRC_KIND, SHADOW_KIND, MODE)
    offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
    if start + n_full * BLOCK < stop:
        _ema_block(ema, src, shadow, offs, offs < stop, coef, SRC_KIND, SHADOW_KIND, MODE)


# --------------------------------------------------------------------------------------------------
# Host side: validation, coefficients, chunk tables
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


def _check_backend(backend: str) -> None:
    # use_triton checks this too, but only once there is a tensor to look at; an empty list must not
    # hide a misspelt backend.
    if backend not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")


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
    if t.dtype not in _DTYPE_CODES:
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
        return _Coefficient(_MODE_COPY, 1.0)
    w = _round_to_float32(1.0 - decay)
    if w < 0.5:
        return _Coefficient(_MODE_FROM_EMA, w)
    return _Coefficient(_MODE_FROM_SRC, 1.0 - w)  # exact: w in [0.5, 1]


@dataclass(frozen=True)
class _Group:
    """One launch: the chunk table of every tensor triple sharing (source dtype, shadow dtype)."""

    table: torch.Tensor  # int64 [rows, 5]: ema_addr, src_addr, shadow_addr, start, stop
    src_kind: int
    shadow_kind: int
    aligned: bool


def _chunk_rows(entries: list[tuple[int, int, int, int, int]], chunk: int) -> torch.Tensor:
    """Splits each ``(ema_addr, src_addr, shadow_addr, lo, hi)`` range into rows of <= ``chunk``."""
    info = torch.tensor(entries, dtype=torch.int64).reshape(-1, 5)
    lo, hi = info[:, 3], info[:, 4]
    counts = torch.div(hi - lo + chunk - 1, chunk, rounding_mode="floor")
    owner = torch.repeat_interleave(torch.arange(len(entries)), counts)
    first_row = torch.cumsum(counts, 0) - counts
    start = lo[owner] + (torch.arange(owner.numel()) - first_row[owner]) * chunk
    stop = torch.minimum(start + chunk, hi[owner])
    return torch.stack([info[owner, 0], info[owner, 1], info[owner, 2], start, stop], dim=1).contiguous()


def _build_groups(
    emas: list[torch.Tensor],
    srcs: list[torch.Tensor],
    shadows: Optional[list[torch.Tensor]],
    element_range: Optional[tuple[int, int]],
    chunk: int,
) -> list[_Group]:
    entries: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for i, (e, s) in enumerate(zip(emas, srcs)):
        lo, hi = 0, e.numel()
        if element_range is not None:
            lo, hi = max(lo, element_range[0]), min(hi, element_range[1])
        if hi <= lo:
            continue
        sh = shadows[i] if shadows is not None else None
        key = (_DTYPE_CODES[s.dtype], _DTYPE_CODES[sh.dtype] if sh is not None else _NO_SHADOW)
        entries.setdefault(key, []).append((e.data_ptr(), s.data_ptr(), sh.data_ptr() if sh is not None else 0, lo, hi))
    groups = []
    for (src_kind, shadow_kind), rows in entries.items():
        aligned = chunk % 16 == 0 and all(
            lo % 16 == 0 and all(a % _ALIGN_BYTES == 0 for a in (ea, sa, ha)) for ea, sa, ha, lo, _ in rows
        )
        table = _chunk_rows(rows, chunk).to(emas[0].device)
        groups.append(_Group(table, src_kind, shadow_kind, aligned))
    return groups


def _launch(group: _Group, coefficient: _Coefficient) -> None:
    """One kernel launch over a group's chunk table (tests wrap this to count launches)."""
    grid = (group.table.shape[0],)
    _ema_chunk_table_kernel[grid](
        group.table,
        coefficient.coef,
        SRC_KIND=group.src_kind,
        SHADOW_KIND=group.shadow_kind,
        MODE=coefficient.mode,
        ALIGNED=group.aligned,
        BLOCK=BLOCK,
        num_warps=4,
        enable_fp_fusion=False,  # keep a + c*(b - a) two roundings, identical to the reference
    )


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
    _launch_groups(_build_groups(emas, srcs, shadows, element_range, chunk), emas[0].device, decay)


def _launch_groups(groups: list[_Group], device: torch.device, decay: float) -> None:
    coefficient = _coefficient(decay)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for group in groups:
            _launch(group, coefficient)


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

    def __init__(self, key: tuple, fingerprint: tuple, run_triton: bool, groups: list[_Group],
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
    groups = _build_groups(emas, srcs, shadows, None, CHUNK) if run_triton else []
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
        if coefficient.mode == _MODE_COPY:
            e.copy_(src)
        elif coefficient.mode == _MODE_FROM_EMA:
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
    _check_backend(backend)
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
    """A float32 EMA over a fixed list of tensors, driven by an :class:`EMADecaySchedule`.

    The EMA (and optional shadow) tensors are owned by the caller, e.g. fp32 shards beside a ZeRO-3
    partition or a LoRA adapter's averaged weights; :meth:`update` is called once per optimizer step
    with the current online tensors and pulls the decay from the schedule.
    """

    def __init__(
        self,
        ema_tensors: Sequence[torch.Tensor],
        schedule: EMADecaySchedule,
        shadow_tensors: Optional[Sequence[torch.Tensor]] = None,
        backend: str = "auto",
    ):
        self.ema_tensors = _as_list(ema_tensors, "ema")
        self.shadow_tensors = _as_list(shadow_tensors, "shadow")
        _check_targets(self.ema_tensors, self.shadow_tensors)
        _check_backend(backend)
        self.schedule = schedule
        self.backend = backend
        self._plan: Optional[_Plan] = None

    @torch.no_grad()
    def update(self, src_tensors: TensorOrList) -> float:
        """Applies one EMA step towards ``src_tensors``; returns the decay it used. Inputs are
        validated before the schedule advances, so a rejected call leaves the state unchanged.

        The first call validates every tensor and builds the plan (chunk tables); later calls compare
        the fingerprint of the EMA, source and shadow tensors with the plan's (see :class:`_Plan`) and
        launch, rebuilding only when a tensor changed."""
        srcs = _items(src_tensors)
        plan = self._plan
        if plan is None or plan.key != _plan_key(len(self.ema_tensors), self.backend) or \
                plan.fingerprint != _fingerprint(self.ema_tensors, srcs, self.shadow_tensors):
            plan = self._plan = None
            plan = self._plan = _build_plan(self.ema_tensors, srcs, self.shadow_tensors, self.backend)
        decay = self.schedule.next_decay()
        _run_plan(plan, self.ema_tensors, srcs, self.shadow_tensors, decay)
        return decay

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
