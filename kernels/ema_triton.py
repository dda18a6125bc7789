"""The Triton side of the multi-tensor EMA update (kernels/ema.py has the numerics, the eager reference
and the public API): the chunk-table kernel, the tables it walks and its launch.

A model has hundreds to thousands of parameter tensors (or, under ZeRO-3, one large flat shard per
rank); one launch per tensor would make this memory-bound update launch-bound. The kernel instead walks
a device-side *chunk table*: one row per chunk of at most ``CHUNK`` elements, holding the int64 base
addresses of the EMA, source and shadow tensors and the chunk's ``[start, stop)`` element range. One
program handles one row, so an update costs one launch per (source dtype, shadow dtype) group,
independent of the number of tensors. All element offsets are int64.

bfloat16 sources and shadows are read and written as raw bits (``uint16``) and converted with integer
operations: Triton's CPU interpreter truncates (and mishandles subnormals) in its native bfloat16 casts,
and the bit form is exact on every backend.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import device_context, interpreter_enabled, jit_kernels

BLOCK = 1024
"""Elements one program processes per loop iteration."""
CHUNK = 64 * BLOCK
"""Elements per chunk-table row (one program): large enough to amortise a program's start-up, small
enough that a single big shard still spreads over many programs."""

# dtype codes understood by the kernel (constexpr), and the update modes.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NO_SHADOW = -1
MODE_COPY = 0  # d == 0: ema = src
MODE_FROM_EMA = 1  # w < 0.5: ema + w * (src - ema)
MODE_FROM_SRC = 2  # w >= 0.5: src + (1 - w) * (ema - src)
_ALIGN_BYTES = 16


# --------------------------------------------------------------------------------------------------
# Kernel body and its device functions, jitted on first use by `_kernels()` (`_common.jit_kernels`,
# which also binds `_bf16_bits`, the round-to-nearest-even bfloat16 bits shared with the other kernels).
# --------------------------------------------------------------------------------------------------
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


def _to_f32(val, KIND: tl.constexpr):
    """Widens loaded ``KIND`` elements to float32 exactly (bfloat16 bits shifted into place)."""
    if KIND == 1:
        val = (val.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return val.to(tl.float32)


def _from_f32(val, KIND: tl.constexpr):
    """Narrows float32 to ``KIND`` with round-to-nearest-even; bfloat16 as raw bits, NaN kept quiet."""
    if KIND == 1:
        out = _bf16_bits(val)  # noqa: F821 - bound by jit_kernels
    elif KIND == 2:
        out = val.to(tl.float16)
    else:
        out = val
    return out


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


class _Kernels(NamedTuple):
    chunk_table: triton.JITFunction


@functools.cache
def _kernels(interpreted: bool) -> _Kernels:
    """The jitted kernel; ``interpreted`` must equal TRITON_INTERPRET now (triton.jit reads it)."""
    return _Kernels(*jit_kernels((_ema_chunk_table_kernel,), interpreted, globals(),
                                 device_functions=(_typed_pointer, _to_f32, _from_f32, _ema_block)))


# --------------------------------------------------------------------------------------------------
# Chunk tables and the launch
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
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


def build_groups(
    emas: list[torch.Tensor],
    srcs: list[torch.Tensor],
    shadows: Optional[list[torch.Tensor]],
    element_range: Optional[tuple[int, int]],
    chunk: int,
) -> list[Group]:
    """The chunk tables of validated tensors, one :class:`Group` per (source dtype, shadow dtype).
    ``element_range`` restricts every tensor to ``[lo, hi)`` (tests reach offsets past 2**31 with it)."""
    entries: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for i, (e, s) in enumerate(zip(emas, srcs)):
        lo, hi = 0, e.numel()
        if element_range is not None:
            lo, hi = max(lo, element_range[0]), min(hi, element_range[1])
        if hi <= lo:
            continue
        sh = shadows[i] if shadows is not None else None
        key = (DTYPE_CODES[s.dtype], DTYPE_CODES[sh.dtype] if sh is not None else NO_SHADOW)
        entries.setdefault(key, []).append((e.data_ptr(), s.data_ptr(), sh.data_ptr() if sh is not None else 0, lo, hi))
    groups = []
    for (src_kind, shadow_kind), rows in entries.items():
        aligned = chunk % 16 == 0 and all(
            lo % 16 == 0 and all(a % _ALIGN_BYTES == 0 for a in (ea, sa, ha)) for ea, sa, ha, lo, _ in rows
        )
        table = _chunk_rows(rows, chunk).to(emas[0].device)
        groups.append(Group(table, src_kind, shadow_kind, aligned))
    return groups


def launch(group: Group, mode: int, coef: float) -> None:
    """One kernel launch over a group's chunk table (tests wrap this to count launches)."""
    _kernels(interpreter_enabled()).chunk_table[(group.table.shape[0],)](
        table_ptr=group.table,
        coef=coef,
        SRC_KIND=group.src_kind,
        SHADOW_KIND=group.shadow_kind,
        MODE=mode,
        ALIGNED=group.aligned,
        BLOCK=BLOCK,
        num_warps=4,
        enable_fp_fusion=False,  # keep a + c*(b - a) two roundings, identical to the reference
    )


def launch_groups(groups: list[Group], device: torch.device, mode: int, coef: float) -> None:
    """Every group's launch, with ``mode`` and the float32 ``coef`` of one decay (kernels/ema.py)."""
    with device_context(device):
        for group in groups:
            launch(group, mode, coef)
