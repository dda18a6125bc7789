"""The Triton side of the fused dual-timestep embedding (kernels/dual_time_embedding.py has the eager
reference, the checks and the public API): the kernel bodies, their tile sizes and launches, and the
autograd Function, entered through :func:`embed`. Everything here runs on validated inputs.

The combine rule (kernels/dual_time_rule.py) reaches the kernels as compile-time constants
(:func:`rule_constexprs`): each backbone's rule is its own specialisation, and Qwen-Image's compiles to
the operations this file had before rules existed. Shapes: Linear1 (H, C), Linear2 (D, H); H == D but
for Z-Image (256 -> 1024 -> 256).

Forward: sinusoid of both embedders' times (1 launch), grouped Linear1+SiLU (1 launch), both Linear2
with the extra inputs and the combine in the epilogue (1 launch). Backward: grouped weight-grad of both
Linear2 with the c row scaling and the bias reduction fused (1 launch), grouped data-grad through
Linear2 with the scaling and SiLU' fused in the epilogue (1 launch), grouped weight-grad of both Linear1
with its bias reduction (1 launch). When the embedders' own outputs are returned too (SANA) or the
extra inputs need gradients (SD3.5), both embedders' output gradients are formed first in torch (two
elementwise ops; the extra inputs' gradients are those) and the kernels run unscaled on them. Nothing
is left to cuBLAS: every product has the batch as one of its dimensions, so its FLOPs (~4 B D H) are
small and the cost is memory traffic over the weights and gradients; separate cuBLAS calls plus
elementwise passes would add traffic and launches, the fused kernels read each weight once and write
each gradient once.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import block_size, cdiv, device_context, interpreter_enabled, jit_kernels, next_power_of_2
from .dual_time_rule import QWEN_IMAGE, SECOND_INPUTS, combine_coefficient


@functools.lru_cache(maxsize=16)
def rule_constexprs(rule) -> tuple[dict, dict]:
    """A :class:`~.dual_time_rule.CombineRule` as the kernels' constants: ``(times, coefficient)``, the
    sinusoid kernel's and those of every kernel that forms ``c`` (cached per rule: rules are frozen)."""
    times = dict(SCALE=rule.sinusoid_scale, TIME_SCALE=rule.time_scale, ABS_FIRST=rule.abs_first,
                 SECOND=SECOND_INPUTS.index(rule.second_input), F64=rule.float64_times)
    coefficient = dict(COEF_ABS=rule.coefficient_abs, COEF_DIV=rule.coefficient_divisor,
                       COEF_ROUND=rule.round_coefficient, F64=rule.float64_times)
    return times, coefficient


class Weights(NamedTuple):
    """The weights and biases of both embedders (``E1`` reads ``*_1``, ``E2`` reads ``*_2``)."""

    w1_1: torch.Tensor
    b1_1: torch.Tensor
    w2_1: torch.Tensor
    b2_1: torch.Tensor
    w1_2: torch.Tensor
    b1_2: torch.Tensor
    w2_2: torch.Tensor
    b2_2: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Kernel bodies and their device functions, jitted on first use by `_kernels()` with
# `_common.jit_kernels`: they call `_cast`, `_dot`, `_sin`, `_cos`, bound there to the GPU helpers or,
# under the CPU interpreter, to their substitutes (the only difference between the two modes; see
# `_common.py` for why each substitute exists).
# --------------------------------------------------------------------------------------------------
def _coefficient(t_ptr, tt_ptr, stride_t, stride_tt, rows, mask, ty: tl.constexpr, COEF_ABS: tl.constexpr,
                 COEF_DIV: tl.constexpr, COEF_ROUND: tl.constexpr, F64: tl.constexpr):
    """The rule's ``c`` of the batch ``rows`` as float32, formed as ``combine_coefficient`` forms it:
    ``t - tt`` (float64 when F64, else float32), ``|.|``, ``/ COEF_DIV`` (IEEE division), and rounded to
    ``ty`` when COEF_ROUND (the value is then exact in float32). Qwen-Image's ``(t - tt).to(dtype)``."""
    t = tl.load(t_ptr + rows * stride_t, mask=mask, other=0.0)
    tt = tl.load(tt_ptr + rows * stride_tt, mask=mask, other=0.0)
    if F64:
        c = t.to(tl.float64) - tt.to(tl.float64)
    else:
        c = t.to(tl.float32) - tt.to(tl.float32)
    if COEF_ABS:
        c = tl.abs(c)
    if COEF_DIV != 1.0:
        if F64:
            c = c / COEF_DIV  # div.rn.f64: float64 division is IEEE on GPUs
        else:
            c = tl.math.div_rn(c, COEF_DIV)
    if COEF_ROUND:
        c = _cast(c, ty)  # noqa: F821 - bound by jit_kernels
    return c.to(tl.float32)


def _rule_time(ptr, stride, rows, mask, TIME_SCALE: tl.constexpr, F64: tl.constexpr):
    """One time of the batch ``rows`` times TIME_SCALE, in float64 when F64, else float32."""
    x = tl.load(ptr + rows * stride, mask=mask, other=0.0)
    if F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if TIME_SCALE != 1.0:
        x = x * TIME_SCALE
    return x


def _sinusoid_body(t_ptr, tt_ptr, stride_t, stride_tt, freq_ptr, proj_ptr, B, HALF: tl.constexpr,
                   SCALE: tl.constexpr, TIME_SCALE: tl.constexpr, ABS_FIRST: tl.constexpr, SECOND: tl.constexpr,
                   F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """proj[g, b] = [cos(x), sin(x)] with x = (tau_g[b] * freq) * SCALE, where tau_0 = a or |a| and tau_1
    = b, b - a or a - b (SECOND = 0, 1, 2), a = t * TIME_SCALE, b = tt * TIME_SCALE, rounded to float32."""
    pid_b = tl.program_id(0)
    group = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < HALF
    if group == 0:
        times = _rule_time(t_ptr, stride_t, offs_b, mask_b, TIME_SCALE, F64)
        if ABS_FIRST:
            times = tl.abs(times)
    else:
        times = _rule_time(tt_ptr, stride_tt, offs_b, mask_b, TIME_SCALE, F64)
        if SECOND == 1:
            times = times - _rule_time(t_ptr, stride_t, offs_b, mask_b, TIME_SCALE, F64)
        elif SECOND == 2:
            times = _rule_time(t_ptr, stride_t, offs_b, mask_b, TIME_SCALE, F64) - times
    freqs = tl.load(freq_ptr + offs_h, mask=mask_h, other=0.0)
    args = (times.to(tl.float32)[:, None] * freqs[None, :]) * SCALE
    out_ty = proj_ptr.dtype.element_ty
    rows = proj_ptr + group * B * (2 * HALF) + offs_b.to(tl.int64)[:, None] * (2 * HALF)
    mask = mask_b[:, None] & mask_h[None, :]
    tl.store(rows + offs_h[None, :], _cast(_cos(args), out_ty), mask=mask)
    tl.store(rows + HALF + offs_h[None, :], _cast(_sin(args), out_ty), mask=mask)


def _linear1_silu_body(proj_ptr, w_a_ptr, w_b_ptr, bias_a_ptr, bias_b_ptr, pre_ptr, h_ptr, B, H, C,
                       STORE_PRE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Grouped Linear1 + SiLU: for g in {0, 1} (grid axis 2), pre = proj[g] @ W1_g^T + b1_g and
    h = silu(pre), both (B, H). ``pre`` is kept (when STORE_PRE) for SiLU's backward."""
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
    mask_n = offs_n < H
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
    offs = group * B * H + offs_b.to(tl.int64)[:, None] * H + offs_n[None, :]
    mask = mask_b[:, None] & mask_n[None, :]
    tl.store(h_ptr + offs, _cast(h, out_ty), mask=mask)
    if STORE_PRE:
        tl.store(pre_ptr + offs, pre, mask=mask)


def _linear2_combine_body(h_ptr, w_a_ptr, w_b_ptr, bias_a_ptr, bias_b_ptr, t_ptr, tt_ptr, stride_t, stride_tt,
                          extra_ptr, parts_ptr, out_ptr, B, H, D, COEF_ABS: tl.constexpr, COEF_DIV: tl.constexpr,
                          COEF_ROUND: tl.constexpr, F64: tl.constexpr, HAS_EXTRA: tl.constexpr,
                          STORE_PARTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Both Linear2 products with the combine in the epilogue: e_g = h_g @ W2_g^T + b2_g (+ extra[g] when
    HAS_EXTRA, each sum rounded as the eager module's), out = e_0 + e_1 * c in float32 with one rounding;
    e_0, e_1 are also stored to ``parts`` (2, B, D) when STORE_PARTS."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_n = offs_n < D
    h1_rows = h_ptr + offs_b.to(tl.int64)[:, None] * H
    h2_rows = h1_rows + B * H
    wa_cols = w_a_ptr + offs_n.to(tl.int64)[None, :] * H
    wb_cols = w_b_ptr + offs_n.to(tl.int64)[None, :] * H
    acc1 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        mask_x = mask_b[:, None] & mask_k[None, :]
        mask_w = mask_k[:, None] & mask_n[None, :]
        acc1 = _dot(tl.load(h1_rows + kk[None, :], mask=mask_x, other=0.0),
                    tl.load(wa_cols + kk[:, None], mask=mask_w, other=0.0), acc1)
        acc2 = _dot(tl.load(h2_rows + kk[None, :], mask=mask_x, other=0.0),
                    tl.load(wb_cols + kk[:, None], mask=mask_w, other=0.0), acc2)
    out_ty = out_ptr.dtype.element_ty
    bias_a = tl.load(bias_a_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    bias_b = tl.load(bias_b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    offs = offs_b.to(tl.int64)[:, None] * D + offs_n[None, :]
    mask = mask_b[:, None] & mask_n[None, :]
    e1 = _cast(acc1 + bias_a[None, :], out_ty)
    e2 = _cast(acc2 + bias_b[None, :], out_ty)
    if HAS_EXTRA:
        e1 = _cast(e1.to(tl.float32) + tl.load(extra_ptr + offs, mask=mask, other=0.0).to(tl.float32), out_ty)
        e2 = _cast(e2.to(tl.float32) + tl.load(extra_ptr + B * D + offs, mask=mask, other=0.0).to(tl.float32),
                   out_ty)
    if STORE_PARTS:
        tl.store(parts_ptr + offs, e1, mask=mask)
        tl.store(parts_ptr + B * D + offs, e2, mask=mask)
    c = _coefficient(t_ptr, tt_ptr, stride_t, stride_tt, offs_b, mask_b, out_ty, COEF_ABS, COEF_DIV, COEF_ROUND, F64)
    out = e1.to(tl.float32) + e2.to(tl.float32) * c[:, None]
    tl.store(out_ptr + offs, _cast(out, out_ty), mask=mask)


def _linear2_dgrad_silu_body(g_ptr, g_group_stride, w_a_ptr, w_b_ptr, pre_ptr, t_ptr, tt_ptr, stride_t, stride_tt,
                             da_ptr, B, H, D, COEF_ABS: tl.constexpr, COEF_DIV: tl.constexpr,
                             COEF_ROUND: tl.constexpr, F64: tl.constexpr, SCALE_GROUP1: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grouped data gradient through Linear2 and SiLU: dA_g = s_g * (G_g @ W2_g) * silu'(pre_g), (B, H),
    with G_g at ``g_ptr + g * g_group_stride`` (B, D), s_0 = 1 and s_1 = c when SCALE_GROUP1 (the
    combine's scaling, applied per row in the epilogue), else 1."""
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
    mask_m = offs_m < H
    g_rows = g_ptr + group * g_group_stride + offs_b.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        g = tl.load(g_rows + kk[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * H + offs_m[None, :],
                    mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc = _dot(g, w, acc)
    out_ty = da_ptr.dtype.element_ty
    offs = group * B * H + offs_b.to(tl.int64)[:, None] * H + offs_m[None, :]
    mask = mask_b[:, None] & mask_m[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-pre))
    if SCALE_GROUP1:
        c = _coefficient(t_ptr, tt_ptr, stride_t, stride_tt, offs_b, mask_b, out_ty, COEF_ABS, COEF_DIV, COEF_ROUND,
                         F64)
        scale = tl.where(group == 1, c, 1.0)
        da = acc * scale[:, None] * (sig * (1.0 + pre * (1.0 - sig)))
    else:
        da = acc * (sig * (1.0 + pre * (1.0 - sig)))
    tl.store(da_ptr + offs, _cast(da, out_ty), mask=mask)


def _weight_grad_body(g_ptr, g_group_stride, x_ptr, t_ptr, tt_ptr, stride_t, stride_tt, dw_ptr, db_ptr,
                      B, N, M, COEF_ABS: tl.constexpr, COEF_DIV: tl.constexpr, COEF_ROUND: tl.constexpr,
                      F64: tl.constexpr, SCALE_GROUP1: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """Grouped weight and bias gradients of a Linear y = x W^T + b, reduced over the batch:
    dW_g = (s_g * G_g)^T @ X_g and db_g = sum_b s_g * G_g, with s_1 = c when SCALE_GROUP1 (else 1).
    The bias reduction reuses the G tiles already loaded for the product."""
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
            c = _coefficient(t_ptr, tt_ptr, stride_t, stride_tt, bb, mask_bb, in_ty, COEF_ABS, COEF_DIV, COEF_ROUND,
                             F64)
            scale = tl.where(group == 1, c, 1.0)
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
    sinusoid: triton.JITFunction
    linear1_silu: triton.JITFunction
    linear2_combine: triton.JITFunction
    linear2_dgrad_silu: triton.JITFunction
    weight_grad: triton.JITFunction


_BODIES = (_sinusoid_body, _linear1_silu_body, _linear2_combine_body, _linear2_dgrad_silu_body, _weight_grad_body)


@functools.lru_cache(maxsize=2)
def _kernels(interpreted: bool) -> _Kernels:
    """The kernels for the current Triton mode. ``interpreted`` must equal TRITON_INTERPRET at the
    time of the call (triton.jit reads it); it selects the helper set the kernel bodies see."""
    return _Kernels(*jit_kernels(_BODIES, interpreted, globals(), device_functions=(_coefficient, _rule_time)))


# --------------------------------------------------------------------------------------------------
# Tile sizes and launches
# --------------------------------------------------------------------------------------------------
class _Tiles(NamedTuple):
    b: int  # batch rows per tile
    n: int  # output features per tile (of D), and the reduction step over D
    c: int  # reduction step over the sinusoid channels
    n2: int  # output features per tile of the Linear2 + combine kernel (see _combine_block_n)
    h: int  # hidden features per tile (of H), and the reduction step over H; == n when H == D


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
    (132 SMs) gets 16. The reduction step over H stays ``_Tiles.h`` whatever this returns, so every
    output sums its products in the same order (the result does not depend on the SM count)."""
    for block_n in (64, 32, 16):
        if row_tiles * cdiv(width, block_n) >= sms:
            return block_n
    return 16


@functools.lru_cache(maxsize=64)
def _tiles(batch: int, width: int, channels: int, sms: int = _DEFAULT_SMS, hidden: int | None = None) -> _Tiles:
    """Tile sizes for D = ``width`` outputs and H = ``hidden`` (default D) hidden features. The batch is
    small (<= 64 typical) and D is 3072 for Qwen-Image; 64-wide feature tiles give 2 * D / 64 = 96
    programs per grouped launch. The combine kernel, one group only, narrows its output tiles until its
    grid covers the ``sms`` SMs (:func:`_combine_block_n`)."""
    b = block_size(batch, 64)
    n = block_size(width, 64)
    return _Tiles(b=b, n=n, c=block_size(channels, 64), n2=min(n, _combine_block_n(cdiv(batch, b), width, sms)),
                  h=n if hidden is None else block_size(hidden, 64))


def launch_sinusoid(t: torch.Tensor, tt: torch.Tensor, frequencies: torch.Tensor, proj: torch.Tensor,
                    rule=QWEN_IMAGE) -> None:
    """Fill ``proj`` (2, B, C) with the sinusoids of the rule's two embedder times (``t`` and ``tt`` for
    Qwen-Image) in one launch; ``frequencies`` is the float32 table of C / 2 frequencies."""
    batch, half = t.shape[0], proj.shape[2] // 2
    block_b = block_size(batch, 64)
    with device_context(t.device):
        _kernels(interpreter_enabled()).sinusoid[(cdiv(batch, block_b), 2)](
            t_ptr=t, tt_ptr=tt, stride_t=t.stride(0), stride_tt=tt.stride(0), freq_ptr=frequencies, proj_ptr=proj,
            B=batch, HALF=half, **rule_constexprs(rule)[0], BLOCK_B=block_b, BLOCK_H=next_power_of_2(half))


# --------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------
def embed(t: torch.Tensor, tt: torch.Tensor, *, frequencies: torch.Tensor, dtype: torch.dtype,
          weights: Weights, rule=QWEN_IMAGE, extra: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
          with_parts: bool = False):
    """The rule's ``temb`` on validated inputs, differentiable in the 8 weights and the extra inputs (the
    entry to :class:`_DualTimeEmbeddingFn`, whose ``apply`` takes positional arguments only). With
    ``with_parts``, returns ``(temb, parts)``, ``parts`` (2, B, D) holding both embedders' outputs
    (extra inputs added), also differentiable."""
    extra_1, extra_2 = (None, None) if extra is None else extra
    return _DualTimeEmbeddingFn.apply(t, tt, frequencies, dtype, rule, with_parts, extra_1, extra_2, *weights)


_FIRST_WEIGHT = 8
"""Index of ``w1_1`` among :meth:`_DualTimeEmbeddingFn.forward`'s inputs (the extra inputs are 6 and 7)."""


class _DualTimeEmbeddingFn(torch.autograd.Function):
    """The forward's three launches and the backward's three (see the module docstring)."""

    @staticmethod
    def forward(ctx, t, tt, frequencies, dtype, rule, with_parts, extra_1, extra_2, *weights):
        w = Weights(*(p.contiguous() for p in weights))
        batch, (hidden, channels), width = t.shape[0], w.w1_1.shape, w.w2_1.shape[0]
        tiles = _tiles(batch, width, channels, _sm_count(t.device), hidden=hidden)
        needs_grad = any(ctx.needs_input_grad[6:])
        dev = t.device
        proj = torch.empty((2, batch, channels), dtype=dtype, device=dev)
        h = torch.empty((2, batch, hidden), dtype=dtype, device=dev)
        pre = torch.empty((2, batch, hidden), dtype=dtype, device=dev) if needs_grad else h
        out = torch.empty((batch, width), dtype=dtype, device=dev)
        extra = torch.stack([extra_1, extra_2]) if extra_1 is not None else out
        parts = torch.empty((2, batch, width), dtype=dtype, device=dev) if with_parts else out
        rows = cdiv(batch, tiles.b)

        launch_sinusoid(t, tt, frequencies, proj, rule)
        kernels = _kernels(interpreter_enabled())
        with device_context(dev):
            kernels.linear1_silu[(rows, cdiv(hidden, tiles.h), 2)](
                proj_ptr=proj, w_a_ptr=w.w1_1, w_b_ptr=w.w1_2, bias_a_ptr=w.b1_1, bias_b_ptr=w.b1_2, pre_ptr=pre,
                h_ptr=h, B=batch, H=hidden, C=channels,
                STORE_PRE=needs_grad, BLOCK_B=tiles.b, BLOCK_N=tiles.h, BLOCK_K=tiles.c)
            kernels.linear2_combine[(rows, cdiv(width, tiles.n2))](
                h_ptr=h, w_a_ptr=w.w2_1, w_b_ptr=w.w2_2, bias_a_ptr=w.b2_1, bias_b_ptr=w.b2_2, t_ptr=t, tt_ptr=tt,
                stride_t=t.stride(0), stride_tt=tt.stride(0), extra_ptr=extra, parts_ptr=parts, out_ptr=out,
                B=batch, H=hidden, D=width, **rule_constexprs(rule)[1], HAS_EXTRA=extra_1 is not None,
                STORE_PARTS=with_parts, BLOCK_B=tiles.b, BLOCK_N=tiles.n2, BLOCK_K=tiles.h)
        if needs_grad:
            ctx.save_for_backward(t, tt, w.w2_1, w.w2_2, proj, pre, h)
            ctx.rule, ctx.with_parts = rule, with_parts
        return (out, parts) if with_parts else out

    @staticmethod
    def backward(ctx, grad_out, grad_parts=None):
        t, tt, w2_1, w2_2, proj, pre, h = ctx.saved_tensors
        dtype = h.dtype
        g = grad_out.to(dtype).contiguous()
        tiles = _tiles(t.shape[0], w2_1.shape[0], proj.shape[2], hidden=w2_1.shape[1])
        wants = Weights(*ctx.needs_input_grad[_FIRST_WEIGHT:])
        wants_extra = ctx.needs_input_grad[6:_FIRST_WEIGHT]
        grouped = None  # the gradients of both embedders' outputs, (2, B, D), when the fused scaling cannot do
        if ctx.with_parts or any(wants_extra):
            # The combine's gradient as eager autograd forms it: dE1 = g, dE2 = g * c rounded to dtype;
            # each plus the gradient of the parts output.
            c = combine_coefficient(t, tt, ctx.rule, dtype)
            grouped = torch.stack([g, (g.to(c.dtype) * c[:, None]).to(dtype)])
            if ctx.with_parts:
                grouped = grouped + grad_parts.to(dtype)
        with device_context(t.device):
            grads = _backward_launches(g if grouped is None else grouped, t, tt, w2_1, w2_2, proj, pre, h, tiles,
                                       wants, ctx.rule, scaled=grouped is None)
        extra_grads = tuple(grouped[i] if want else None for i, want in enumerate(wants_extra))
        return (None,) * 6 + extra_grads + tuple(grads.get(n) if want else None
                                                 for n, want in zip(Weights._fields, wants))


def _backward_launches(g, t, tt, w2_1, w2_2, proj, pre, h, tiles: _Tiles, wants: Weights, rule,
                       scaled: bool) -> dict[str, torch.Tensor]:
    """The backward's three launches; the gradients by weight name. ``g`` is the gradient of the output
    (B, D) when ``scaled`` (the kernels scale E2's rows by ``c``), else those of both embedders' outputs
    (2, B, D)."""
    kernels = _kernels(interpreter_enabled())
    batch, (width, hidden), channels = t.shape[0], w2_1.shape, proj.shape[2]
    dtype, dev = h.dtype, t.device
    rows = cdiv(batch, tiles.b)
    times = dict(t_ptr=t, tt_ptr=tt, stride_t=t.stride(0), stride_tt=tt.stride(0), **rule_constexprs(rule)[1])
    g_stride = 0 if scaled else batch * width
    grads: dict[str, torch.Tensor] = {}

    if wants.w2_1 or wants.b2_1 or wants.w2_2 or wants.b2_2:
        dw2 = torch.empty((2, width, hidden), dtype=dtype, device=dev)
        db2 = torch.empty((2, width), dtype=dtype, device=dev)
        kernels.weight_grad[(cdiv(width, tiles.n), cdiv(hidden, tiles.h), 2)](
            g_ptr=g, g_group_stride=g_stride, x_ptr=h, **times, dw_ptr=dw2, db_ptr=db2, B=batch, N=width, M=hidden,
            SCALE_GROUP1=scaled, BLOCK_N=tiles.n, BLOCK_M=tiles.h, BLOCK_B=tiles.b)
        grads.update(w2_1=dw2[0], b2_1=db2[0], w2_2=dw2[1], b2_2=db2[1])

    if wants.w1_1 or wants.b1_1 or wants.w1_2 or wants.b1_2:
        da = torch.empty((2, batch, hidden), dtype=dtype, device=dev)
        kernels.linear2_dgrad_silu[(rows, cdiv(hidden, tiles.h), 2)](
            g_ptr=g, g_group_stride=g_stride, w_a_ptr=w2_1, w_b_ptr=w2_2, pre_ptr=pre, **times, da_ptr=da, B=batch,
            H=hidden, D=width, SCALE_GROUP1=scaled, BLOCK_B=tiles.b, BLOCK_M=tiles.h, BLOCK_K=tiles.n)
        dw1 = torch.empty((2, hidden, channels), dtype=dtype, device=dev)
        db1 = torch.empty((2, hidden), dtype=dtype, device=dev)
        kernels.weight_grad[(cdiv(hidden, tiles.h), cdiv(channels, tiles.c), 2)](
            g_ptr=da, g_group_stride=batch * hidden, x_ptr=proj, **times, dw_ptr=dw1, db_ptr=db1, B=batch,
            N=hidden, M=channels, SCALE_GROUP1=False, BLOCK_N=tiles.h, BLOCK_M=tiles.c, BLOCK_B=tiles.b)
        grads.update(w1_1=dw1[0], b1_1=db1[0], w1_2=dw1[1], b1_2=db1[1])
    return grads
