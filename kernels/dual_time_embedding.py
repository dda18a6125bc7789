"""Fused dual-timestep embedding for TwinFlow's Qwen-Image (ALGORITHM.md §2).

    temb = E1(t) + E2(tt) * (t - tt),   E(tau) = Linear2(SiLU(Linear1(sinusoid(tau))))

``sinusoid`` is diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``
(cos half first) and each ``E`` is the ``timestep_embedder`` of a ``QwenTimestepProjEmbeddings``.

Three pieces live here:

* :func:`dual_time_embedding_reference`: plain torch ops that reproduce diffusers bit for bit (same
  frequency table, same order of float32 operations, same casts), plus the combine. It is the
  executable specification the kernels are tested against.
* Triton kernels, three launches forward and three backward (see :class:`_DualTimeEmbeddingFn`).
* :class:`DualTimestepEmbedding`, a drop-in module reading the weights of two diffusers embedders
  that it does not own (state-dict keys stay ``time_text_embed.*`` / ``time_text_embed_2.*``).

Numerics. Everything accumulates in float32. The kernels round to the compute dtype where the eager
module boundaries round (sinusoid, Linear1 output, SiLU output, each Linear2 output, ``t - tt``), then
combine in float32 with a single final rounding. The sinusoid uses the frequency table computed by
torch exactly as diffusers computes it, and ``(t * freq) * 1000`` in float32 as diffusers does; sin and
cos come from libdevice on CUDA (the CUDA math library torch also uses; Triton links it flush-to-zero,
which can only matter for denormal arguments, |t| < 1e-34) and from numpy under the CPU interpreter,
which differ from torch's CPU sin/cos by 1 ulp at most over 40k times in [-1, 1] (the tests allow 2:
each library is documented within 1 ulp of the exact value).

Gradients: for the weights and biases of both embedders. ``t`` and ``tt`` are data (sampled times);
the Triton path rejects them when they require grad instead of silently returning no gradient.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
import math
import operator
import weakref
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import nn

from ._common import BACKENDS, KernelBackendError, cdiv, interpreter_enabled, jit_kernels, next_power_of_2, use_triton

# The diffusers Timesteps configuration used by QwenTimestepProjEmbeddings.
SINUSOID_SCALE = 1000.0
SINUSOID_MAX_PERIOD = 10000
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------

def _frequencies(half: int, device: torch.device) -> torch.Tensor:
    """``exp(-ln(max_period) * i / half)`` for i < half, with the same float32 torch ops (and therefore
    the same exp implementation on this device) as diffusers' ``get_timestep_embedding`` with
    ``downscale_freq_shift=0``."""
    exponent = -math.log(SINUSOID_MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32, device=device)
    return torch.exp(exponent / half)


@functools.lru_cache(maxsize=16)
def _frequency_table(half: int, device: torch.device) -> torch.Tensor:
    """:func:`_frequencies` cached for kernel launches (a constant per device). Built outside inference
    mode, so a first call from a sampler does not cache a tensor autograd may refuse later. The eager
    reference recomputes it instead, as diffusers does, which keeps it free of caches for
    ``torch.compile``."""
    with torch.inference_mode(False):
        return _frequencies(half, device)


def timestep_sinusoid(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Diffusers' ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``,
    bit for bit: float32 ``(t * freq) * 1000``, then ``[cos, sin]``. Returns float32 ``(B, channels)``."""
    args = t[:, None].float() * _frequencies(channels // 2, t.device)[None, :]
    args = SINUSOID_SCALE * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed_reference(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ``QwenTimestepProjEmbeddings`` forward: sinusoid cast to ``dtype``, Linear, SiLU, Linear."""
    proj = timestep_sinusoid(t, w1.shape[1]).to(dtype)
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(proj, w1, b1)), w2, b2)


def dual_time_embedding_reference(t: torch.Tensor, tt: torch.Tensor,
                                  w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                                  w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                                  dtype: torch.dtype) -> torch.Tensor:
    """``E1(t) + E2(tt) * (t - tt)`` with plain torch ops; ``E1`` and ``E2`` equal diffusers' modules
    exactly. ``(t - tt)`` is taken in float32 and cast to ``dtype``, so rows with ``t == tt`` return
    ``E1(t)`` exactly. Returns ``(B, D)`` in ``dtype``."""
    _validate(t, tt, (w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2), dtype)
    e1 = _embed_reference(t, w1_1, b1_1, w2_1, b2_1, dtype)
    e2 = _embed_reference(tt, w1_2, b1_2, w2_2, b2_2, dtype)
    delta = (t.float() - tt.float()).to(dtype)
    return e1 + e2 * delta[:, None]


_WEIGHT_NAMES = ("w1_1", "b1_1", "w2_1", "b2_1", "w1_2", "b1_2", "w2_2", "b2_2")


def _validate_times(t: torch.Tensor, tt: torch.Tensor) -> None:
    for name, x in (("t", t), ("tt", tt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of times, got shape {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if t.shape != tt.shape or t.numel() == 0:
        raise ValueError(f"t and tt must have the same non-empty shape, got {tuple(t.shape)} and {tuple(tt.shape)}")


def _validate(t: torch.Tensor, tt: torch.Tensor, weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """Clear errors for bad shapes, dtypes and devices (shared by both backends)."""
    _validate_times(t, tt)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if any(w is None for w in weights):
        missing = [n for n, w in zip(_WEIGHT_NAMES, weights) if w is None]
        raise ValueError(f"the timestep embedders must have biases; missing: {missing}")
    w1 = weights[0]
    if w1.dim() != 2 or w1.shape[1] % 2:
        raise ValueError(f"w1_1 must be (D, C) with an even sinusoid width C, got {tuple(w1.shape)}")
    d, c = w1.shape
    expected = ((d, c), (d,), (d, d), (d,)) * 2
    for name, w, shape in zip(_WEIGHT_NAMES, weights, expected):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {shape} (D={d}, C={c})")
        if w.dtype != dtype:
            raise ValueError(f"{name} is {w.dtype} but the embedding dtype is {dtype}; cast the embedder")
        if w.device != t.device or tt.device != t.device:
            raise ValueError(f"{name} is on {w.device}, t on {t.device}, tt on {tt.device}: use one device")


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_validated: list = [None]
"""The fingerprint of the last weights :func:`_validate_cached` accepted (one slot: a model has one
pair of embedders)."""


def _validate_cached(t: torch.Tensor, tt: torch.Tensor, weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """:func:`_validate`, with the weight checks skipped when the weights have the fingerprint (shapes,
    dtypes, devices, plus ``dtype`` and the times' device) that passed last time;
    the times are checked on every call. Everything ``_validate`` checks about a weight is a function
    of its fingerprint, so a skipped check would have passed."""
    try:
        key = (dtype, t.device, tuple(map(_SHAPE, weights)), tuple(map(_DTYPE, weights)),
               tuple(map(_DEVICE, weights)))
    except TypeError:  # a missing bias (None): the full check names it
        key = None
    if key is not None and key == _validated[0]:
        _validate_times(t, tt)
        if tt.device != t.device:
            raise ValueError(f"t is on {t.device} but tt is on {tt.device}: use one device")
        return
    _validate(t, tt, weights, dtype)
    _validated[0] = key


# --------------------------------------------------------------------------------------------------
# Triton kernels
#
# The kernel bodies below are plain functions turned into kernels by `_kernels()` on first use, with
# `_common.jit_kernels`: they call `_cast`, `_dot`, `_sin`, `_cos`, bound there to the GPU helpers or,
# under the CPU interpreter, to their substitutes (the only difference between the two modes; see
# `_common.py` for why each substitute exists).
# --------------------------------------------------------------------------------------------------

def _sinusoid_body(t_ptr, tt_ptr, stride_t, stride_tt, freq_ptr, proj_ptr, B,
                   HALF: tl.constexpr, SCALE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """proj[g, b] = [cos(a), sin(a)] with a = (time_g[b] * freq) * SCALE; g = 0 for t, 1 for tt."""
    pid_b = tl.program_id(0)
    group = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < HALF
    if group == 0:
        times = tl.load(t_ptr + offs_b * stride_t, mask=mask_b, other=0.0)
    else:
        times = tl.load(tt_ptr + offs_b * stride_tt, mask=mask_b, other=0.0)
    freqs = tl.load(freq_ptr + offs_h, mask=mask_h, other=0.0)
    args = (times.to(tl.float32)[:, None] * freqs[None, :]) * SCALE
    out_ty = proj_ptr.dtype.element_ty
    rows = proj_ptr + group * B * (2 * HALF) + offs_b.to(tl.int64)[:, None] * (2 * HALF)
    mask = mask_b[:, None] & mask_h[None, :]
    tl.store(rows + offs_h[None, :], _cast(_cos(args), out_ty), mask=mask)
    tl.store(rows + HALF + offs_h[None, :], _cast(_sin(args), out_ty), mask=mask)


def _linear1_silu_body(proj_ptr, w_a_ptr, w_b_ptr, bias_a_ptr, bias_b_ptr, pre_ptr, h_ptr, B, D, C,
                       STORE_PRE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Grouped Linear1 + SiLU: for g in {0, 1} (grid axis 2), pre = proj[g] @ W1_g^T + b1_g and
    h = silu(pre). ``pre`` is kept (when STORE_PRE) for SiLU's backward."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    if group == 0:
        w_ptr = w_a_ptr
        bias_ptr = bias_a_ptr
    else:
        w_ptr = w_b_ptr
        bias_ptr = bias_b_ptr
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_n = offs_n < D
    x_rows = proj_ptr + group * B * C + offs_b.to(tl.int64)[:, None] * C
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * C
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < C
        x = tl.load(x_rows + kk[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(x, w, acc)
    out_ty = h_ptr.dtype.element_ty
    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    pre = _cast(acc + bias[None, :], out_ty)
    pre32 = pre.to(tl.float32)
    h = pre32 / (1.0 + tl.exp(-pre32))
    offs = group * B * D + offs_b.to(tl.int64)[:, None] * D + offs_n[None, :]
    mask = mask_b[:, None] & mask_n[None, :]
    tl.store(h_ptr + offs, _cast(h, out_ty), mask=mask)
    if STORE_PRE:
        tl.store(pre_ptr + offs, pre, mask=mask)


def _linear2_combine_body(h_ptr, w_a_ptr, w_b_ptr, bias_a_ptr, bias_b_ptr, t_ptr, tt_ptr, stride_t, stride_tt,
                          out_ptr, B, D, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both Linear2 products with the combine in the epilogue: out = e1 + e2 * (t - tt)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_n = offs_n < D
    h1_rows = h_ptr + offs_b.to(tl.int64)[:, None] * D
    h2_rows = h1_rows + B * D
    wa_cols = w_a_ptr + offs_n.to(tl.int64)[None, :] * D
    wb_cols = w_b_ptr + offs_n.to(tl.int64)[None, :] * D
    acc1 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        mask_x = mask_b[:, None] & mask_k[None, :]
        mask_w = mask_k[:, None] & mask_n[None, :]
        acc1 = _dot(tl.load(h1_rows + kk[None, :], mask=mask_x, other=0.0),
                    tl.load(wa_cols + kk[:, None], mask=mask_w, other=0.0), acc1)
        acc2 = _dot(tl.load(h2_rows + kk[None, :], mask=mask_x, other=0.0),
                    tl.load(wb_cols + kk[:, None], mask=mask_w, other=0.0), acc2)
    out_ty = out_ptr.dtype.element_ty
    bias_a = tl.load(bias_a_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    bias_b = tl.load(bias_b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    e1 = _cast(acc1 + bias_a[None, :], out_ty).to(tl.float32)
    e2 = _cast(acc2 + bias_b[None, :], out_ty).to(tl.float32)
    t = tl.load(t_ptr + offs_b * stride_t, mask=mask_b, other=0.0).to(tl.float32)
    tt = tl.load(tt_ptr + offs_b * stride_tt, mask=mask_b, other=0.0).to(tl.float32)
    delta = _cast(t - tt, out_ty).to(tl.float32)
    out = e1 + e2 * delta[:, None]
    offs = offs_b.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(out_ptr + offs, _cast(out, out_ty), mask=mask_b[:, None] & mask_n[None, :])


def _linear2_dgrad_silu_body(g_ptr, w_a_ptr, w_b_ptr, pre_ptr, t_ptr, tt_ptr, stride_t, stride_tt, da_ptr, B, D,
                             BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grouped data gradient through Linear2 and SiLU: dA_g = s_g * (g @ W2_g) * silu'(pre_g), with
    s_0 = 1 and s_1 = (t - tt) (the combine's scaling, applied per row in the epilogue)."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    group = tl.program_id(2)
    if group == 0:
        w_ptr = w_a_ptr
    else:
        w_ptr = w_b_ptr
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_m = offs_m < D
    g_rows = g_ptr + offs_b.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        g = tl.load(g_rows + kk[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * D + offs_m[None, :],
                    mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc = _dot(g, w, acc)
    out_ty = da_ptr.dtype.element_ty
    t = tl.load(t_ptr + offs_b * stride_t, mask=mask_b, other=0.0).to(tl.float32)
    tt = tl.load(tt_ptr + offs_b * stride_tt, mask=mask_b, other=0.0).to(tl.float32)
    scale = tl.where(group == 1, _cast(t - tt, out_ty).to(tl.float32), 1.0)
    offs = group * B * D + offs_b.to(tl.int64)[:, None] * D + offs_m[None, :]
    mask = mask_b[:, None] & mask_m[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-pre))
    da = acc * scale[:, None] * (sig * (1.0 + pre * (1.0 - sig)))
    tl.store(da_ptr + offs, _cast(da, out_ty), mask=mask)


def _weight_grad_body(g_ptr, g_group_stride, x_ptr, t_ptr, tt_ptr, stride_t, stride_tt, dw_ptr, db_ptr,
                      B, N, M, SCALE_GROUP1: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """Grouped weight and bias gradients of a Linear y = x W^T + b, reduced over the batch:
    dW_g = (s_g * G_g)^T @ X_g and db_g = sum_b s_g * G_g, with s_1 = (t - tt) when SCALE_GROUP1
    (else 1). The bias reduction reuses the G tiles already loaded for the product."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    group = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bb = tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_m = offs_m < M
    g_base = g_ptr + group * g_group_stride
    x_base = x_ptr + group * B * M
    in_ty = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + offs_bb
        mask_bb = bb < B
        gt = tl.load(g_base + bb.to(tl.int64)[None, :] * N + offs_n[:, None],
                     mask=mask_n[:, None] & mask_bb[None, :], other=0.0)
        if SCALE_GROUP1:
            t = tl.load(t_ptr + bb * stride_t, mask=mask_bb, other=0.0).to(tl.float32)
            tt = tl.load(tt_ptr + bb * stride_tt, mask=mask_bb, other=0.0).to(tl.float32)
            scale = tl.where(group == 1, _cast(t - tt, in_ty).to(tl.float32), 1.0)
            gt = _cast(gt.to(tl.float32) * scale[None, :], in_ty)
        x = tl.load(x_base + bb.to(tl.int64)[:, None] * M + offs_m[None, :],
                    mask=mask_bb[:, None] & mask_m[None, :], other=0.0)
        bias_acc += tl.sum(gt.to(tl.float32), axis=1)
        acc = _dot(gt, x, acc)
    out_ty = dw_ptr.dtype.element_ty
    offs = group * N * M + offs_n.to(tl.int64)[:, None] * M + offs_m[None, :]
    tl.store(dw_ptr + offs, _cast(acc, out_ty), mask=mask_n[:, None] & mask_m[None, :])
    if pid_m == 0:
        tl.store(db_ptr + group * N + offs_n, _cast(bias_acc, out_ty), mask=mask_n)


class _Kernels(NamedTuple):
    sinusoid: object
    linear1_silu: object
    linear2_combine: object
    linear2_dgrad_silu: object
    weight_grad: object


_BODIES = (_sinusoid_body, _linear1_silu_body, _linear2_combine_body, _linear2_dgrad_silu_body, _weight_grad_body)


@functools.lru_cache(maxsize=2)
def _kernels(interpreted: bool) -> _Kernels:
    """The kernels for the current Triton mode. ``interpreted`` must equal TRITON_INTERPRET at the
    time of the call (triton.jit reads it); it selects the helper set the kernel bodies see: each body
    is re-created over a copy of this module's globals in which the helper names are the jitted
    helpers of that mode."""
    return _Kernels(*jit_kernels(_BODIES, interpreted, globals()))


def _block(n: int, cap: int) -> int:
    """A tile size covering ``n`` (power of two, >= 16 for tl.dot, <= cap)."""
    return max(16, min(cap, next_power_of_2(n)))


class _Tiles(NamedTuple):
    b: int  # batch rows per tile
    n: int  # features per tile (outputs, and the reduction step over D)
    c: int  # reduction step over the sinusoid channels
    n2: int  # output features per tile of the Linear2 + combine kernel (see _combine_block_n)


_DEFAULT_SMS = 132
"""Streaming multiprocessors assumed where there is no CUDA device (the interpreter): an H200's count,
so CPU runs use the tile sizes an H200 gets."""


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _combine_block_n(row_tiles: int, width: int, sms: int) -> int:
    """Output features per program of the Linear2 + combine kernel: the widest of 64, 32, 16 whose grid
    (``row_tiles x cdiv(width, BLOCK_N)`` programs) covers every SM, else 16. At Qwen-Image sizes (batch
    <= 64, so one row tile; D = 3072) 64 gives 48 programs, 32 gives 96 and 16 gives 192, so an H200
    (132 SMs) gets 16. The reduction step over D stays ``_Tiles.n`` whatever this returns, so every
    output sums its products in the same order (the result does not depend on the SM count)."""
    for block_n in (64, 32, 16):
        if row_tiles * cdiv(width, block_n) >= sms:
            return block_n
    return 16


@functools.lru_cache(maxsize=64)
def _tiles(batch: int, width: int, channels: int, sms: int = _DEFAULT_SMS) -> _Tiles:
    """Tile sizes. The batch is small (<= 64 typical) and D is 3072 for Qwen-Image; 64-wide feature
    tiles give 2 * D / 64 = 96 programs per grouped launch. The combine kernel, one group only,
    narrows its output tiles until its grid covers the ``sms`` SMs (:func:`_combine_block_n`)."""
    b = _block(batch, 64)
    n = _block(width, 64)
    return _Tiles(b=b, n=n, c=_block(channels, 64), n2=min(n, _combine_block_n(cdiv(batch, b), width, sms)))


def _launch_sinusoid(kernels: _Kernels, t: torch.Tensor, tt: torch.Tensor, proj: torch.Tensor) -> None:
    """Fill ``proj`` (2, B, C) with the sinusoids of ``t`` and ``tt`` in one launch."""
    batch, half = t.shape[0], proj.shape[2] // 2
    block_b = _block(batch, 64)
    kernels.sinusoid[(cdiv(batch, block_b), 2)](
        t, tt, t.stride(0), tt.stride(0), _frequency_table(half, t.device), proj, batch,
        HALF=half, SCALE=SINUSOID_SCALE, BLOCK_B=block_b, BLOCK_H=next_power_of_2(half))


def timestep_sinusoid_pair_triton(t: torch.Tensor, tt: torch.Tensor, channels: int = 256,
                                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel (a) alone: ``stack([timestep_sinusoid(t), timestep_sinusoid(tt)]).to(dtype)``, shape
    (2, B, channels), from one launch (used by the forward; exposed to test it in isolation)."""
    if t.dim() != 1 or t.shape != tt.shape or t.numel() == 0 or channels <= 0 or channels % 2:
        raise ValueError(f"need 1-D t, tt of one non-empty shape and an even channel count; got "
                         f"{tuple(t.shape)}, {tuple(tt.shape)}, channels={channels}")
    use_triton(t, tt, backend="triton")
    if t.dtype != tt.dtype:
        t, tt = t.float(), tt.float()
    proj = torch.empty((2, t.shape[0], channels), dtype=dtype, device=t.device)
    with torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext():
        _launch_sinusoid(_kernels(interpreter_enabled()), t, tt, proj)
    return proj


# --------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------

class _DualTimeEmbeddingFn(torch.autograd.Function):
    """Forward: sinusoid of t and tt (1 launch), grouped Linear1+SiLU (1 launch), both Linear2 with
    the combine in the epilogue (1 launch). Backward: grouped weight-grad of both Linear2 with the
    (t - tt) row scaling and the bias reduction fused (1 launch), grouped data-grad through Linear2
    with the scaling and SiLU' fused in the epilogue (1 launch), grouped weight-grad of both Linear1
    with its bias reduction (1 launch). Nothing is left to cuBLAS: every product has the batch as one
    of its dimensions, so its FLOPs (~4 B D^2) are small and the cost is memory traffic over the
    D x D weights and gradients; separate cuBLAS calls plus elementwise passes would add traffic and
    launches, the fused kernels read each weight once and write each gradient once."""

    @staticmethod
    def forward(ctx, t, tt, w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2, dtype):
        kernels = _kernels(interpreter_enabled())
        batch, (width, channels) = t.shape[0], w1_1.shape
        w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2 = (
            w.contiguous() for w in (w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2))
        tiles = _tiles(batch, width, channels, _sm_count(t.device))
        needs_grad = any(ctx.needs_input_grad[2:10])
        dev = t.device
        proj = torch.empty((2, batch, channels), dtype=dtype, device=dev)
        h = torch.empty((2, batch, width), dtype=dtype, device=dev)
        pre = torch.empty((2, batch, width), dtype=dtype, device=dev) if needs_grad else h
        out = torch.empty((batch, width), dtype=dtype, device=dev)
        rows = cdiv(batch, tiles.b)
        cols = cdiv(width, tiles.n)

        # Triton launches on the current CUDA device: make it the tensors' one (as the loss and EMA do).
        with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
            _launch_sinusoid(kernels, t, tt, proj)
            kernels.linear1_silu[(rows, cols, 2)](
                proj, w1_1, w1_2, b1_1, b1_2, pre, h, batch, width, channels,
                STORE_PRE=needs_grad, BLOCK_B=tiles.b, BLOCK_N=tiles.n, BLOCK_K=tiles.c)
            kernels.linear2_combine[(rows, cdiv(width, tiles.n2))](
                h, w2_1, w2_2, b2_1, b2_2, t, tt, t.stride(0), tt.stride(0), out, batch, width,
                BLOCK_B=tiles.b, BLOCK_N=tiles.n2, BLOCK_K=tiles.n)
        if needs_grad:
            ctx.save_for_backward(t, tt, w2_1, w2_2, proj, pre, h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        t, tt, w2_1, w2_2, proj, pre, h = ctx.saved_tensors
        kernels = _kernels(interpreter_enabled())
        batch, width, channels = t.shape[0], w2_1.shape[0], proj.shape[2]
        g = grad_out.to(h.dtype).contiguous()
        tiles = _tiles(batch, width, channels)
        wants = dict(zip(_WEIGHT_NAMES, ctx.needs_input_grad[2:10]))
        dev = t.device
        with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
            grads = _backward_launches(kernels, g, t, tt, w2_1, w2_2, proj, pre, h, tiles, wants)
        return (None, None, *(grads[n] if wants[n] else None for n in _WEIGHT_NAMES), None)


def _backward_launches(kernels: "_Kernels", g, t, tt, w2_1, w2_2, proj, pre, h, tiles: "_Tiles",
                       wants: dict[str, bool]) -> dict[str, torch.Tensor]:
    """The backward's three launches (see :class:`_DualTimeEmbeddingFn`); the gradients by weight name."""
    batch, width, channels = t.shape[0], w2_1.shape[0], proj.shape[2]
    dtype, dev = h.dtype, t.device
    rows = cdiv(batch, tiles.b)
    cols = cdiv(width, tiles.n)
    grads: dict[str, torch.Tensor] = {}

    if wants["w2_1"] or wants["b2_1"] or wants["w2_2"] or wants["b2_2"]:
        dw2 = torch.empty((2, width, width), dtype=dtype, device=dev)
        db2 = torch.empty((2, width), dtype=dtype, device=dev)
        kernels.weight_grad[(cols, cols, 2)](
            g, 0, h, t, tt, t.stride(0), tt.stride(0), dw2, db2, batch, width, width,
            SCALE_GROUP1=True, BLOCK_N=tiles.n, BLOCK_M=tiles.n, BLOCK_B=tiles.b)
        grads.update(w2_1=dw2[0], b2_1=db2[0], w2_2=dw2[1], b2_2=db2[1])

    if wants["w1_1"] or wants["b1_1"] or wants["w1_2"] or wants["b1_2"]:
        da = torch.empty((2, batch, width), dtype=dtype, device=dev)
        kernels.linear2_dgrad_silu[(rows, cols, 2)](
            g, w2_1, w2_2, pre, t, tt, t.stride(0), tt.stride(0), da, batch, width,
            BLOCK_B=tiles.b, BLOCK_M=tiles.n, BLOCK_K=tiles.n)
        dw1 = torch.empty((2, width, channels), dtype=dtype, device=dev)
        db1 = torch.empty((2, width), dtype=dtype, device=dev)
        kernels.weight_grad[(cols, cdiv(channels, tiles.c), 2)](
            da, batch * width, proj, t, tt, t.stride(0), tt.stride(0), dw1, db1, batch, width, channels,
            SCALE_GROUP1=False, BLOCK_N=tiles.n, BLOCK_M=tiles.c, BLOCK_B=tiles.b)
        grads.update(w1_1=dw1[0], b1_1=db1[0], w1_2=dw1[1], b1_2=db1[1])
    return grads


def dual_time_embedding_triton(t: torch.Tensor, tt: torch.Tensor,
                               w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                               w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                               dtype: torch.dtype) -> torch.Tensor:
    """The Triton path with the reference's signature (differentiable in the 8 weight tensors)."""
    weights = (w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2)
    _validate_cached(t, tt, weights, dtype)
    use_triton(t, tt, backend="triton")  # raises a KernelBackendError when it cannot run
    if dtype not in _KERNEL_DTYPES:
        raise KernelBackendError(f"the Triton dual-time embedding supports {_KERNEL_DTYPES}, got {dtype}")
    if t.requires_grad or tt.requires_grad:
        raise KernelBackendError("the Triton dual-time embedding gives no gradient for t / tt; "
                                 "pass detached times or use backend='eager'")
    if t.dtype != tt.dtype:  # one load type in the kernel; exact, since both paths take .float()
        t, tt = t.float(), tt.float()
    return _DualTimeEmbeddingFn.apply(t, tt, *weights, dtype)


# --------------------------------------------------------------------------------------------------
# Module-level API
# --------------------------------------------------------------------------------------------------

def embedder_weights(embed: nn.Module, name: str = "embedder") -> tuple[torch.Tensor, ...]:
    """``(w1, b1, w2, b2)`` of a ``QwenTimestepProjEmbeddings``, after checking that it is the
    configuration the fused path implements (clear error naming ``name`` otherwise). Only the timestep
    part is read: an ``addition_t_embedding`` (``use_additional_t_cond``) is the caller's to add."""
    proj = getattr(embed, "time_proj", None)
    emb = getattr(embed, "timestep_embedder", None)
    if proj is None or emb is None:
        raise TypeError(f"{name} must be a QwenTimestepProjEmbeddings (time_proj + timestep_embedder), "
                        f"got {type(embed).__name__}")
    lin1, lin2 = getattr(emb, "linear_1", None), getattr(emb, "linear_2", None)
    for lname, lin in (("linear_1", lin1), ("linear_2", lin2)):
        if not isinstance(lin, nn.Linear) or hasattr(lin, "base_layer"):
            raise TypeError(f"{name}.timestep_embedder.{lname} is {type(lin).__name__}, not a plain nn.Linear "
                            "(e.g. wrapped by LoRA); the fused embedding reads its weight directly: "
                            "use the plain diffusers modules (kernels: eager) instead")
    act = getattr(emb, "act", None)
    if not isinstance(act, nn.SiLU) or getattr(emb, "cond_proj", None) is not None \
            or getattr(emb, "post_act", None) is not None:
        raise ValueError(f"{name}.timestep_embedder must be Linear -> SiLU -> Linear without cond_proj/post_act")
    config = (proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale)
    if config != (lin1.in_features, True, 0, SINUSOID_SCALE) or proj.num_channels % 2:
        raise ValueError(f"{name}.time_proj is Timesteps{config} (channels, flip_sin_to_cos, shift, scale); "
                         f"expected ({lin1.in_features}, True, 0, {SINUSOID_SCALE:g})")
    return lin1.weight, lin1.bias, lin2.weight, lin2.bias


_checked_embedders: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure(embed: nn.Module) -> Optional[tuple]:
    """The objects :func:`embedder_weights` inspects, read from the modules' registries (dict look-ups,
    ~1 us): any replaced submodule or parameter gives a different tuple. None when one is missing."""
    try:
        proj, emb = embed._modules["time_proj"], embed._modules["timestep_embedder"]
        sub = emb._modules
        lin1, lin2 = sub["linear_1"], sub["linear_2"]
        return (proj, emb, lin1, lin2, sub.get("act"), sub.get("cond_proj"), sub.get("post_act"),
                proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale,
                *lin1._parameters.values(), *lin2._parameters.values())
    except (AttributeError, KeyError, TypeError):
        return None


def _embedder_weights_cached(embed: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """:func:`embedder_weights`, checked once per embedder and again whenever one of the objects it
    inspects (submodules, parameters, Timesteps configuration) was replaced. The cache holds the
    embedder weakly; the objects are compared by identity (the cached tuple keeps them alive, so an
    ``is`` match is never a recycled object)."""
    structure = _structure(embed)
    cached = _checked_embedders.get(embed) if structure is not None else None
    if cached is not None and len(cached[0]) == len(structure) and all(map(operator.is_, cached[0], structure)):
        return cached[1]
    weights = embedder_weights(embed, name)
    if structure is not None:
        _checked_embedders[embed] = (structure, weights)
    return weights


def dual_time_embedding(t: torch.Tensor, tt: torch.Tensor, embed_1: nn.Module, embed_2: nn.Module,
                        dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """``E1(t) + E2(tt) * (t - tt)`` from two ``QwenTimestepProjEmbeddings`` (``backend``: "triton",
    "eager" or "auto", see ``twinflow.kernels._common``). Reads the weights directly: under ZeRO-3 use
    :class:`DualTimestepEmbedding`, which makes DeepSpeed gather them."""
    weights = _embedder_weights_cached(embed_1, "embed_1") + _embedder_weights_cached(embed_2, "embed_2")
    if backend == "triton" or (use_triton(t, tt, *weights, backend=backend) and dtype in _KERNEL_DTYPES
                               and not (t.requires_grad or tt.requires_grad)):
        return dual_time_embedding_triton(t, tt, *weights, dtype)
    return dual_time_embedding_reference(t, tt, *weights, dtype)


class DualTimestepEmbedding(nn.Module):
    """Drop-in ``E1(t) + E2(tt) * (t - tt)`` over two diffusers embedders it does not own.

    The embedders are kept in a tuple, not as submodules, so they add no parameters and no state-dict
    keys here: the model's keys stay ``time_text_embed.*`` and ``time_text_embed_2.*``.

    DeepSpeed ZeRO-3: a partitioned parameter is gathered only when the forward hook of a module that
    owns or has *registered* it fires, and this module bypasses the embedders' own forwards. So every
    embedder parameter that is partitioned (has ``ds_id``) is registered with
    ``deepspeed.zero.register_external_parameter(self, p)``, at construction and again, for parameters
    partitioned later (``deepspeed.initialize`` converting a model built outside ``zero.Init``), in a
    forward pre-hook that runs before DeepSpeed's own (hooks run in registration order). For the hooks
    to exist at all, this module must be a submodule of the model given to ``deepspeed.initialize``;
    if a weight still arrives partitioned, forward raises instead of reading an empty tensor.
    """

    def __init__(self, embed_1: nn.Module, embed_2: nn.Module, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        embedder_weights(embed_1, "embed_1")
        embedder_weights(embed_2, "embed_2")
        self.backend = backend
        self._embedders = (embed_1, embed_2)
        self._register_partitioned_parameters()
        self.register_forward_pre_hook(DualTimestepEmbedding._pre_forward)

    @staticmethod
    def _pre_forward(module: "DualTimestepEmbedding", args: tuple) -> None:
        module._register_partitioned_parameters()

    def _parameters_read(self) -> tuple[nn.Parameter, ...]:
        """The 8 weights and biases the forward reads (cheap: see :func:`_embedder_weights_cached`)."""
        embed_1, embed_2 = self._embedders
        return _embedder_weights_cached(embed_1, "embed_1") + _embedder_weights_cached(embed_2, "embed_2")

    def _register_partitioned_parameters(self) -> None:
        """Register ZeRO-3 partitioned embedder weights as external parameters of this module."""
        partitioned = [p for p in self._parameters_read() if hasattr(p, "ds_id")]
        registered = getattr(self, "_external_params", {})
        missing = [p for p in partitioned if id(p) not in registered]
        if missing:
            import deepspeed  # only reached when DeepSpeed has already partitioned the parameters

            for p in missing:
                deepspeed.zero.register_external_parameter(self, p)

    def _check_gathered(self) -> None:
        for p in self._parameters_read():
            if hasattr(p, "ds_id"):
                from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

                if p.ds_status != ZeroParamStatus.AVAILABLE:
                    raise RuntimeError(
                        f"ZeRO-3 parameter ds_id={p.ds_id} of the timestep embedders is not gathered: "
                        "DualTimestepEmbedding must be a submodule of the model passed to deepspeed.initialize")

    def forward(self, t: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self._check_gathered()
        embed_1, embed_2 = self._embedders
        return dual_time_embedding(t, tt, embed_1, embed_2, dtype, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
