"""The Triton side of the fused dual-timestep embedding (kernels/dual_time_embedding.py has the eager
reference, the checks and the public API): the kernel bodies, their tile sizes and launches, and the
autograd Function, entered through :func:`embed`. Everything here runs on validated inputs.

Forward: sinusoid of t and tt (1 launch), grouped Linear1+SiLU (1 launch), both Linear2 with the
combine in the epilogue (1 launch). Backward: grouped weight-grad of both Linear2 with the (t - tt) row
scaling and the bias reduction fused (1 launch), grouped data-grad through Linear2 with the scaling and
SiLU' fused in the epilogue (1 launch), grouped weight-grad of both Linear1 with its bias reduction (1
launch). Nothing is left to cuBLAS: every product has the batch as one of its dimensions, so its FLOPs
(~4 B D^2) are small and the cost is memory traffic over the D x D weights and gradients; separate
cuBLAS calls plus elementwise passes would add traffic and launches, the fused kernels read each weight
once and write each gradient once.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import block_size, cdiv, device_context, interpreter_enabled, jit_kernels, next_power_of_2

SINUSOID_SCALE = 1000.0
"""diffusers' ``Timesteps(scale=1000)`` of QwenTimestepProjEmbeddings."""


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
def _time_gap(t_ptr, tt_ptr, stride_t, stride_tt, rows, mask, ty: tl.constexpr):
    """``t - tt`` of the batch ``rows`` in float32, rounded to ``ty`` as the eager combine's
    ``(t - tt).to(dtype)``, and returned as float32 (exact)."""
    t = tl.load(t_ptr + rows * stride_t, mask=mask, other=0.0).to(tl.float32)
    tt = tl.load(tt_ptr + rows * stride_tt, mask=mask, other=0.0).to(tl.float32)
    return _cast(t - tt, ty).to(tl.float32)  # noqa: F821 - bound by jit_kernels


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
    delta = _time_gap(t_ptr, tt_ptr, stride_t, stride_tt, offs_b, mask_b, out_ty)
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
    gap = _time_gap(t_ptr, tt_ptr, stride_t, stride_tt, offs_b, mask_b, out_ty)
    scale = tl.where(group == 1, gap, 1.0)
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
            scale = tl.where(group == 1, _time_gap(t_ptr, tt_ptr, stride_t, stride_tt, bb, mask_bb, in_ty), 1.0)
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
    return _Kernels(*jit_kernels(_BODIES, interpreted, globals(), device_functions=(_time_gap,)))


# --------------------------------------------------------------------------------------------------
# Tile sizes and launches
# --------------------------------------------------------------------------------------------------
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
    b = block_size(batch, 64)
    n = block_size(width, 64)
    return _Tiles(b=b, n=n, c=block_size(channels, 64), n2=min(n, _combine_block_n(cdiv(batch, b), width, sms)))


def launch_sinusoid(t: torch.Tensor, tt: torch.Tensor, frequencies: torch.Tensor, proj: torch.Tensor) -> None:
    """Fill ``proj`` (2, B, C) with the sinusoids of ``t`` and ``tt`` in one launch; ``frequencies`` is
    the float32 table of C / 2 frequencies."""
    batch, half = t.shape[0], proj.shape[2] // 2
    block_b = block_size(batch, 64)
    with device_context(t.device):
        _kernels(interpreter_enabled()).sinusoid[(cdiv(batch, block_b), 2)](
            t_ptr=t, tt_ptr=tt, stride_t=t.stride(0), stride_tt=tt.stride(0), freq_ptr=frequencies, proj_ptr=proj,
            B=batch, HALF=half, SCALE=SINUSOID_SCALE, BLOCK_B=block_b, BLOCK_H=next_power_of_2(half))


# --------------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------------
def embed(t: torch.Tensor, tt: torch.Tensor, *, frequencies: torch.Tensor, dtype: torch.dtype,
          weights: Weights) -> torch.Tensor:
    """``E1(t) + E2(tt) * (t - tt)`` on validated inputs, differentiable in the 8 weights (the entry to
    :class:`_DualTimeEmbeddingFn`, whose ``apply`` takes positional arguments only)."""
    return _DualTimeEmbeddingFn.apply(t, tt, frequencies, dtype, *weights)


class _DualTimeEmbeddingFn(torch.autograd.Function):
    """The forward's three launches and the backward's three (see the module docstring)."""

    @staticmethod
    def forward(ctx, t, tt, frequencies, dtype, *weights):
        w = Weights(*(p.contiguous() for p in weights))
        batch, (width, channels) = t.shape[0], w.w1_1.shape
        tiles = _tiles(batch, width, channels, _sm_count(t.device))
        needs_grad = any(ctx.needs_input_grad[4:])
        dev = t.device
        proj = torch.empty((2, batch, channels), dtype=dtype, device=dev)
        h = torch.empty((2, batch, width), dtype=dtype, device=dev)
        pre = torch.empty((2, batch, width), dtype=dtype, device=dev) if needs_grad else h
        out = torch.empty((batch, width), dtype=dtype, device=dev)
        rows = cdiv(batch, tiles.b)
        cols = cdiv(width, tiles.n)

        launch_sinusoid(t, tt, frequencies, proj)
        kernels = _kernels(interpreter_enabled())
        with device_context(dev):
            kernels.linear1_silu[(rows, cols, 2)](
                proj_ptr=proj, w_a_ptr=w.w1_1, w_b_ptr=w.w1_2, bias_a_ptr=w.b1_1, bias_b_ptr=w.b1_2, pre_ptr=pre,
                h_ptr=h, B=batch, D=width, C=channels,
                STORE_PRE=needs_grad, BLOCK_B=tiles.b, BLOCK_N=tiles.n, BLOCK_K=tiles.c)
            kernels.linear2_combine[(rows, cdiv(width, tiles.n2))](
                h_ptr=h, w_a_ptr=w.w2_1, w_b_ptr=w.w2_2, bias_a_ptr=w.b2_1, bias_b_ptr=w.b2_2, t_ptr=t, tt_ptr=tt,
                stride_t=t.stride(0), stride_tt=tt.stride(0), out_ptr=out, B=batch, D=width,
                BLOCK_B=tiles.b, BLOCK_N=tiles.n2, BLOCK_K=tiles.n)
        if needs_grad:
            ctx.save_for_backward(t, tt, w.w2_1, w.w2_2, proj, pre, h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        t, tt, w2_1, w2_2, proj, pre, h = ctx.saved_tensors
        g = grad_out.to(h.dtype).contiguous()
        tiles = _tiles(t.shape[0], w2_1.shape[0], proj.shape[2])
        wants = Weights(*ctx.needs_input_grad[4:])
        with device_context(t.device):
            grads = _backward_launches(g, t, tt, w2_1, w2_2, proj, pre, h, tiles, wants)
        return (None, None, None, None, *(grads.get(n) if want else None for n, want in zip(Weights._fields, wants)))


def _backward_launches(g, t, tt, w2_1, w2_2, proj, pre, h, tiles: _Tiles, wants: Weights) -> dict[str, torch.Tensor]:
    """The backward's three launches; the gradients by weight name."""
    kernels = _kernels(interpreter_enabled())
    batch, width, channels = t.shape[0], w2_1.shape[0], proj.shape[2]
    dtype, dev = h.dtype, t.device
    rows = cdiv(batch, tiles.b)
    cols = cdiv(width, tiles.n)
    times = dict(t_ptr=t, tt_ptr=tt, stride_t=t.stride(0), stride_tt=tt.stride(0))
    grads: dict[str, torch.Tensor] = {}

    if wants.w2_1 or wants.b2_1 or wants.w2_2 or wants.b2_2:
        dw2 = torch.empty((2, width, width), dtype=dtype, device=dev)
        db2 = torch.empty((2, width), dtype=dtype, device=dev)
        kernels.weight_grad[(cols, cols, 2)](
            g_ptr=g, g_group_stride=0, x_ptr=h, **times, dw_ptr=dw2, db_ptr=db2, B=batch, N=width, M=width,
            SCALE_GROUP1=True, BLOCK_N=tiles.n, BLOCK_M=tiles.n, BLOCK_B=tiles.b)
        grads.update(w2_1=dw2[0], b2_1=db2[0], w2_2=dw2[1], b2_2=db2[1])

    if wants.w1_1 or wants.b1_1 or wants.w1_2 or wants.b1_2:
        da = torch.empty((2, batch, width), dtype=dtype, device=dev)
        kernels.linear2_dgrad_silu[(rows, cols, 2)](
            g_ptr=g, w_a_ptr=w2_1, w_b_ptr=w2_2, pre_ptr=pre, **times, da_ptr=da, B=batch, D=width,
            BLOCK_B=tiles.b, BLOCK_M=tiles.n, BLOCK_K=tiles.n)
        dw1 = torch.empty((2, width, channels), dtype=dtype, device=dev)
        db1 = torch.empty((2, width), dtype=dtype, device=dev)
        kernels.weight_grad[(cols, cdiv(channels, tiles.c), 2)](
            g_ptr=da, g_group_stride=batch * width, x_ptr=proj, **times, dw_ptr=dw1, db_ptr=db1, B=batch, N=width,
            M=channels, SCALE_GROUP1=False, BLOCK_N=tiles.n, BLOCK_M=tiles.c, BLOCK_B=tiles.b)
        grads.update(w1_1=dw1[0], b1_1=db1[0], w1_2=dw1[1], b1_2=db1[1])
    return grads
