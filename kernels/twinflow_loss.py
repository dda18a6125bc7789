"""Fused TwinFlow / RCGM loss (ALGORITHM.md §3.6–3.10) in Triton, with a hand-written backward.

:func:`twinflow_loss_triton` computes what :func:`twinflow.method.loss_math.twinflow_loss_reference`
(the eager specification) computes, from the same tensors and, instead of the method's
``LossArithmetic``, its fields as keyword scalars (this folder imports nothing from ``twinflow``); it
returns ``(base_loss, rect_loss)`` as float32 scalars. ``twinflow.method.loss_math.twinflow_loss``
chooses between the two (the ``kernels`` switch).

Design
------
Each row of ``F`` (B, ...) is flattened to ``n`` elements. The per-element work (final target, squared
error) is memory-bound over the B x n elements; the per-row work (time weight, Barron weight, means)
touches B values. So the forward is two launches:

1. the rows kernel (``_rows_body``), grid ``(ceil(n / BLOCK), B)``: one program reads one BLOCK-wide slice of one row of
   ``F``, ``target`` and, only where the row uses them, ``v_c``/``v_u`` (guided rows), ``rcgm_acc``
   (non-adv rows) and ``rect_diff`` (the first E rows); it builds the final target ``y`` and writes the
   partial sums of ``(F - y)^2`` and of the rectification error ``(F - (F - clamp(diff)))^2`` to a
   (B, blocks, 2) buffer (stage one of a two-stage reduction: no atomics, deterministic).
2. the epilogue kernel (``_epilogue_body``), one program: sums the partials per row, then computes the per-row MSE, loss
   weight (l2, or Barron's detached weight), time weight, both means, and the per-row gradient
   coefficients the backward needs.

The backward is one launch of the gradient kernel (``_grad_body``), same grid as (1):
``dF = g_base * a_row * (F - y) + g_rect * b_row * (F - y_rect)``, written in ``F``'s dtype, where
``a_row = 2/n * w_time * w_loss / max(count, 1)`` on ``loss_rows`` (0 elsewhere) and
``b_row = 2/n * w_loss_rect * dist_match_cof / E`` on the e2e rows. The targets are constants (see
loss_math.py), so ``F`` is the only input that receives a gradient; the backward is not itself
differentiable (no double backward).

What the backward reads: the residuals ``F - y`` (B x n) and ``F - y_rect`` (E x n), saved in float32
by the forward when ``F`` requires grad. The alternative, recomputing ``y`` in the backward, would keep
``target``, ``v_c``, ``v_u``, ``rcgm_acc``, ``rect_diff`` and ``F`` alive until the backward (up to six
B x n tensors instead of at most two) and re-read them all (up to ~24 bytes per element instead of 4-8),
so saving the residuals is cheaper in both memory and bandwidth; float32 keeps the gradient as exact as
the reference's for bf16 inputs. Nothing is saved when ``F`` does not require grad.

Numerics: everything is float32 whatever the input dtypes, with each operation rounded separately as
in the eager reference (kernels are compiled without FMA contraction): the RCGM finite difference
``(F (t - tt) - acc - delta y) / delta`` cancels and then divides by ``delta = 0.01``, so a contracted
``F (t - tt) - acc`` would already move ``d`` by about 1e-5. Rows a branch does not use are masked out of
the loads and every branch is a select, so NaN/inf in unread rows (e.g. ``v_c`` of unguided rows, or
``rcgm_acc`` of adv rows) never reaches a result, and the short RCGM branch never divides (no NaN when
``t == tt``). Divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` is approximate on
GPUs). ``tan`` and ``pow`` come from libdevice on GPUs (the CUDA math library torch uses); the CPU
interpreter has no libdevice, so there ``tan = sin / cos`` and ``pow = exp2(p log2 x)`` (numpy float32,
within a few ulp of torch), and it truncates fp32 -> bf16 casts, so the gradient store rounds to nearest
even with integer ops there, as the GPU's native cast does (``kernels/_common.py`` holds these
substitutes, the only code that differs between the two modes).

Layout: each input is viewed as (rows, n) with ``reshape``; the kernels take a row stride and need unit
stride inside a row. Row-strided views (a slice of a larger batch, or ``x[:, :k]`` of a 2-D tensor) are
read in place; any other layout (channels-last, transposed) is copied once by ``reshape``/``contiguous``.
The gradient is returned contiguous. Row offsets are int64.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import block_size, cdiv, device_context, interpreter_enabled, jit_kernels, next_power_of_2, use_triton

__all__ = ["twinflow_loss_triton"]

_MAX_BLOCK = 1024
"""Elements of one row per program: large enough to stream, small enough for many programs per row."""
_EPILOGUE_TILE = 4096
"""Partial sums the epilogue loads per loop step (rows x blocks)."""
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Loss modes of the epilogue (constexpr).
_L2 = 0
_BARRON_CONSTANT = 1  # |alpha - 2| < 1e-5: the weight is 1, the loss is mse / c
_BARRON = 2


# --------------------------------------------------------------------------------------------------
# Kernel bodies. They are decorated by `_kernels()` on first use rather than at import: triton.jit
# picks compiled or interpreted mode from TRITON_INTERPRET when it runs, and importing this module early
# (the objective does) must not freeze that choice. `_common.jit_kernels` binds `_cast`, `_tan`, `_pow`
# to libdevice / the native cast on GPUs and to the interpreter's substitutes on CPU (see _common.py).
# Divisions use `tl.math.div_rn`: a bare `/` is the approximate div.full.f32 on GPUs.
# --------------------------------------------------------------------------------------------------
def _rows_body(
    F, T, VC, VU, ACC, RD, t_ptr, tt_ptr, adv_ptr,
    res_ptr, rres_ptr, part_ptr,
    n, n_blocks, E,
    stride_f, stride_t, stride_vc, stride_vu, stride_acc, stride_rd,
    enhanced_ratio, enhanced_range_lo, enhanced_range_hi, rcgm_delta,
    HAS_GUIDE: tl.constexpr, REPLACE: tl.constexpr, HAS_RCGM: tl.constexpr, HAS_RECT: tl.constexpr,
    SAVE_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    """Final target and partial squared errors of one BLOCK slice of one row.

    A scalar row predicate restricts a block mask as ``tl.where(pred, mask, False)``: Triton 3.9's
    interpreter cannot evaluate ``mask & pred`` for a block ``mask`` and a scalar ``pred``.
    """
    blk = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    t = tl.load(t_ptr + row)
    tt = tl.load(tt_ptr + row)
    not_adv = tl.load(adv_ptr + row) == 0

    f = tl.load(F + row64 * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(T + row64 * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GUIDE:
        # §3.6: guided rows only; the loads of other rows are masked off, so their values never matter.
        guided = (t > enhanced_range_lo) & (t < enhanced_range_hi) & not_adv
        guide_mask = tl.where(guided, mask, False)
        vc = tl.load(VC + row64 * stride_vc + cols, mask=guide_mask, other=0.0).to(tl.float32)
        vu = tl.load(VU + row64 * stride_vu + cols, mask=guide_mask, other=0.0).to(tl.float32)
        if REPLACE:
            guided_y = vu + enhanced_ratio * (vc - vu)
        else:
            guided_y = y + enhanced_ratio * (vc - vu)
        y = tl.where(guided, guided_y, y)
    if HAS_RCGM:
        # §3.7 step 3 on non-adv rows; the short branch (gap < delta, t == tt included) does not divide.
        acc_mask = tl.where(not_adv, mask, False)
        acc = tl.load(ACC + row64 * stride_acc + cols, mask=acc_mask, other=0.0).to(tl.float32)
        gap = t - tt
        long = tl.math.div_rn(f * gap - acc - rcgm_delta * y, rcgm_delta)
        d = tl.where(gap >= rcgm_delta, long, f - y)
        d = tl.minimum(tl.maximum(d, -1.0), 1.0)
        y = tl.where(not_adv, f - d, y)
    r = tl.where(mask, f - y, 0.0)
    part = part_ptr + (row64 * n_blocks + blk) * 2
    tl.store(part, tl.sum(r * r, axis=0))
    if SAVE_RES:
        tl.store(res_ptr + row64 * n + cols, r, mask=mask)
    if HAS_RECT:
        # §3.9 on the first E rows: target F - clamp(v_fake - v_real, -1, 1), residual F - target.
        rect_mask = tl.where(row < E, mask, False)
        dv = tl.load(RD + row64 * stride_rd + cols, mask=rect_mask, other=0.0).to(tl.float32)
        dv = tl.minimum(tl.maximum(dv, -1.0), 1.0)
        rr = tl.where(rect_mask, f - (f - dv), 0.0)
        tl.store(part + 1, tl.sum(rr * rr, axis=0))
        if SAVE_RES:
            tl.store(rres_ptr + row64 * n + cols, rr, mask=rect_mask)
    else:
        tl.store(part + 1, 0.0)


def _epilogue_body(
    part_ptr, t_ptr, tt_ptr, adv_ptr, sel_ptr, base_ptr, rect_ptr, coef_ptr,
    B, E, n_blocks, n_f, e_f, c, alpha_gap, exponent, c2_eps, dist_match_cof, time_angle,
    LOSS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per-row sums, weights and means (one program). Writes both losses and the 2 x B coefficients."""
    rows = tl.arange(0, BLOCK_B)
    row_mask = rows < B
    sse = tl.zeros([BLOCK_B], dtype=tl.float32)
    sse_rect = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, n_blocks, BLOCK_P):
        blocks = start + tl.arange(0, BLOCK_P)
        m = row_mask[:, None] & (blocks < n_blocks)[None, :]
        offs = (rows[:, None].to(tl.int64) * n_blocks + blocks[None, :]) * 2
        sse += tl.sum(tl.load(part_ptr + offs, mask=m, other=0.0), axis=1)
        sse_rect += tl.sum(tl.load(part_ptr + offs + 1, mask=m, other=0.0), axis=1)

    # §3.10 per-row loss of the MSE m: l2 -> m; Barron -> m * w / c with the detached weight w, so the
    # loss weight (dloss/dm as autograd sees it) is w / c.
    mse = tl.math.div_rn(sse, n_f)
    mse_rect = tl.math.div_rn(sse_rect, n_f)
    if LOSS == 0:
        w_loss = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        w_rect = w_loss
        loss = mse
        loss_rect = mse_rect
    else:
        if LOSS == 1:
            w = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
            w_r = w
        else:
            base_pow = tl.math.div_rn(tl.math.div_rn(mse, c2_eps), alpha_gap) + 1.0
            base_pow_r = tl.math.div_rn(tl.math.div_rn(mse_rect, c2_eps), alpha_gap) + 1.0
            w = _pow(base_pow, exponent)
            w_r = _pow(base_pow_r, exponent)
        loss = tl.math.div_rn(mse * w, c)
        loss_rect = tl.math.div_rn(mse_rect * w_r, c)
        w_loss = tl.math.div_rn(w, c)
        w_rect = tl.math.div_rn(w_r, c)

    # §3.8 time weight tan((1 - (|t| - |tt|)) pi / 2.5) + 1, and 1 on adv rows.
    t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)
    tt = tl.load(tt_ptr + rows, mask=row_mask, other=0.0)
    angle = (1.0 - (tl.abs(t) - tl.abs(tt))) * time_angle
    tan = _tan(angle)
    adv = tl.load(adv_ptr + rows, mask=row_mask, other=0) != 0
    w_time = tl.where(adv, 1.0, tan + 1.0)

    selected = (tl.load(sel_ptr + rows, mask=row_mask, other=0) != 0) & row_mask
    count = tl.maximum(tl.sum(selected.to(tl.float32), axis=0), 1.0)
    tl.store(base_ptr, tl.math.div_rn(tl.sum(tl.where(selected, loss * w_time, 0.0), axis=0), count))
    is_e2e = rows < E
    tl.store(rect_ptr, tl.math.div_rn(tl.sum(tl.where(is_e2e, loss_rect, 0.0), axis=0), e_f) * dist_match_cof)
    a_row = tl.math.div_rn(tl.math.div_rn(tl.where(selected, w_time * w_loss, 0.0) * 2.0, n_f), count)
    b_row = tl.math.div_rn(tl.math.div_rn(tl.where(is_e2e, w_rect, 0.0) * 2.0, n_f) * dist_match_cof, e_f)
    tl.store(coef_ptr + rows, a_row, mask=row_mask)
    tl.store(coef_ptr + B + rows, b_row, mask=row_mask)


def _grad_body(
    res_ptr, rres_ptr, coef_ptr, g_base_ptr, g_rect_ptr, dF_ptr, B, E, n,
    HAS_RECT: tl.constexpr, BLOCK: tl.constexpr,
):
    """dF = g_base * a_row * (F - y) + g_rect * b_row * (F - y_rect), in dF's dtype."""
    blk = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(coef_ptr + row) * tl.load(g_base_ptr).to(tl.float32)
    g = a * tl.load(res_ptr + row64 * n + cols, mask=mask, other=0.0)
    if HAS_RECT:
        if row < E:
            b = tl.load(coef_ptr + B + row) * tl.load(g_rect_ptr).to(tl.float32)
            g += b * tl.load(rres_ptr + row64 * n + cols, mask=mask, other=0.0)
    tl.store(dF_ptr + row64 * n + cols, _cast(g, dF_ptr.dtype.element_ty), mask=mask)


class _Kernels(NamedTuple):
    """The three jitted kernels of one Triton mode (compiled or interpreted)."""

    rows: triton.JITFunction
    epilogue: triton.JITFunction
    grad: triton.JITFunction


@functools.cache
def _kernels(interpreted: bool) -> _Kernels:
    """The jitted kernels; ``interpreted`` must equal TRITON_INTERPRET now (triton.jit reads it)."""
    return _Kernels(*jit_kernels((_rows_body, _epilogue_body, _grad_body), interpreted, globals()))


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
class _Settings(NamedTuple):
    """The scalar arguments of :func:`twinflow_loss_triton`, by name (ALGORITHM.md §3.6-3.10)."""

    enhanced_ratio: float
    enhanced_range: tuple[float, float]
    guide_replace: bool
    rcgm_delta: float
    loss_type: str  # "l2" or "barron_reweighting"
    loss_c: float
    loss_alpha: float
    dist_match_cof: float


class _Rows(NamedTuple):
    """Every input but ``F`` as the kernels read it: (rows, n) views with unit stride inside a row (None
    where that part of the loss is off), float32 times and uint8 row masks."""

    target: torch.Tensor
    v_c: Optional[torch.Tensor]
    v_u: Optional[torch.Tensor]
    rcgm_acc: Optional[torch.Tensor]
    rect_diff: Optional[torch.Tensor]  # (E, n), E >= 1
    t: torch.Tensor
    tt: torch.Tensor
    adv: torch.Tensor
    loss_rows: torch.Tensor


def _as_rows(x: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """``x`` as (rows, n) with unit stride inside a row: a view when possible, otherwise a copy."""
    if x is None:
        return None
    x2 = x.reshape(rows, -1)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _row_stride(x: Optional[torch.Tensor]) -> int:
    """Row stride of a (rows, n) input; 0 for an absent one (its loads are compiled out)."""
    return x.stride(0) if x is not None else 0


def _num_warps(block: int) -> int:
    """Four warps for full blocks; one for short rows, where more would idle."""
    return 4 if block >= 512 else 1


def _loss_mode(settings: _Settings) -> int:
    """The epilogue's constexpr loss mode, with the reference's alpha == 2 test."""
    if settings.loss_type == "l2":
        return _L2
    return _BARRON_CONSTANT if abs(settings.loss_alpha - 2.0) < 1e-5 else _BARRON


def _check_inputs(F: torch.Tensor, target: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, adv: torch.Tensor,
                  loss_rows: torch.Tensor, guidance: tuple, rcgm_acc: Optional[torch.Tensor],
                  rect_diff: Optional[torch.Tensor]) -> None:
    """Clear errors for inputs the kernel cannot take (the reference would fail or broadcast).
    ``guidance`` is ``(v_c, v_u)``."""
    if F.dim() < 1 or F.shape[0] == 0 or F[0].numel() == 0:
        raise ValueError(f"F must have at least one row of at least one element, got shape {tuple(F.shape)}")
    B = F.shape[0]
    v_c, v_u = guidance
    for name, x in (("target", target), ("v_c", v_c), ("v_u", v_u), ("rcgm_acc", rcgm_acc)):
        if x is not None and x.shape != F.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but F has shape {tuple(F.shape)}")
    if v_c is not None and v_u is None:
        raise ValueError("v_c is given without v_u")
    if rect_diff is not None and (rect_diff.shape[1:] != F.shape[1:] or rect_diff.shape[0] > B):
        raise ValueError(f"rect_diff has shape {tuple(rect_diff.shape)}; expected (E <= {B}, *{tuple(F.shape[1:])})")
    for name, x in (("F", F), ("target", target), ("v_c", v_c), ("v_u", v_u), ("rcgm_acc", rcgm_acc),
                    ("rect_diff", rect_diff)):
        if x is not None and x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16, float16")
    for name, x in (("t", t), ("tt", tt), ("adv", adv), ("loss_rows", loss_rows)):
        if x.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(x.shape)}")
    for name, x in (("adv", adv), ("loss_rows", loss_rows)):
        if x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")


class _Forward(NamedTuple):
    base: torch.Tensor
    rect: torch.Tensor
    coef: torch.Tensor  # (2, B): base and rectification gradient coefficients per row
    res: Optional[torch.Tensor]  # (B, n) float32 F - y, when saved
    rres: Optional[torch.Tensor]  # (E, n) float32 F - y_rect, when saved


def _forward(F: torch.Tensor, rows: _Rows, settings: _Settings, save_residuals: bool) -> _Forward:
    """The two forward launches on validated inputs."""
    B = F.shape[0]
    E = rows.rect_diff.shape[0] if rows.rect_diff is not None else 0
    F2 = _as_rows(F, B)
    n = F2.shape[1]
    f32 = dict(dtype=torch.float32, device=F.device)
    block = block_size(n, _MAX_BLOCK)
    n_blocks = cdiv(n, block)
    partials = torch.empty(B, n_blocks, 2, **f32)
    res = torch.empty(B, n, **f32) if save_residuals else None
    rres = torch.empty(E, n, **f32) if save_residuals and E else None
    base, rect = torch.empty((), **f32), torch.empty((), **f32)
    coef = torch.empty(2, B, **f32)

    block_b = max(16, next_power_of_2(B))
    block_p = max(1, min(next_power_of_2(n_blocks), _EPILOGUE_TILE // block_b))
    kernels = _kernels(interpreter_enabled())
    dummy = partials  # any tensor: a pointer argument whose loads/stores are compiled out
    with device_context(F.device):
        kernels.rows[(n_blocks, B)](
            F=F2, T=rows.target, VC=_or(rows.v_c, dummy), VU=_or(rows.v_u, dummy), ACC=_or(rows.rcgm_acc, dummy),
            RD=_or(rows.rect_diff, dummy), t_ptr=rows.t, tt_ptr=rows.tt, adv_ptr=rows.adv,
            res_ptr=_or(res, dummy), rres_ptr=_or(rres, dummy), part_ptr=partials,
            n=n, n_blocks=n_blocks, E=E,
            stride_f=F2.stride(0), stride_t=rows.target.stride(0), stride_vc=_row_stride(rows.v_c),
            stride_vu=_row_stride(rows.v_u), stride_acc=_row_stride(rows.rcgm_acc),
            stride_rd=_row_stride(rows.rect_diff),
            enhanced_ratio=float(settings.enhanced_ratio), enhanced_range_lo=float(settings.enhanced_range[0]),
            enhanced_range_hi=float(settings.enhanced_range[1]), rcgm_delta=float(settings.rcgm_delta),
            HAS_GUIDE=rows.v_c is not None, REPLACE=bool(settings.guide_replace),
            HAS_RCGM=rows.rcgm_acc is not None, HAS_RECT=E > 0, SAVE_RES=save_residuals, BLOCK=block,
            num_warps=_num_warps(block), enable_fp_fusion=False,
        )
        c, alpha = settings.loss_c, settings.loss_alpha
        kernels.epilogue[(1,)](
            part_ptr=partials, t_ptr=rows.t, tt_ptr=rows.tt, adv_ptr=rows.adv, sel_ptr=rows.loss_rows,
            base_ptr=base, rect_ptr=rect, coef_ptr=coef,
            B=B, E=E, n_blocks=n_blocks, n_f=float(n), e_f=float(max(E, 1)), c=float(c),
            alpha_gap=abs(alpha - 2.0), exponent=(alpha - 2.0) / 2.0, c2_eps=c * c + 1e-8,
            dist_match_cof=float(settings.dist_match_cof), time_angle=math.pi / 2.5,
            LOSS=_loss_mode(settings), BLOCK_B=block_b, BLOCK_P=block_p, num_warps=4, enable_fp_fusion=False,
        )
    return _Forward(base, rect, coef, res, rres)


def _or(x: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor: Triton needs a tensor even where it is never used."""
    return x if x is not None else fallback


def _grad(fwd_coef: torch.Tensor, res: torch.Tensor, rres: Optional[torch.Tensor], g_base: torch.Tensor,
          g_rect: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The backward launch: dL/dF as a contiguous (B, n) tensor of ``dtype``."""
    B, n = res.shape
    E = rres.shape[0] if rres is not None else 0
    dF = torch.empty(B, n, dtype=dtype, device=res.device)
    block = block_size(n, _MAX_BLOCK)
    with device_context(res.device):
        _kernels(interpreter_enabled()).grad[(cdiv(n, block), B)](
            res_ptr=res, rres_ptr=_or(rres, res), coef_ptr=fwd_coef, g_base_ptr=g_base.float().contiguous(),
            g_rect_ptr=g_rect.float().contiguous(), dF_ptr=dF, B=B, E=E, n=n,
            HAS_RECT=E > 0, BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False,
        )
    return dF


class _TwinFlowLossFn(torch.autograd.Function):
    """Autograd wrapper: gradient to ``F`` only (targets and teacher outputs are constants). ``F`` is the
    one tensor argument; the other inputs arrive as a :class:`_Rows` and the scalars as a
    :class:`_Settings`, both built by keyword (``apply`` takes positional arguments only)."""

    @staticmethod
    def forward(ctx, F: torch.Tensor, rows: _Rows, settings: _Settings) -> tuple[torch.Tensor, torch.Tensor]:
        out = _forward(F, rows, settings, save_residuals=ctx.needs_input_grad[0])
        ctx.save_for_backward(out.coef, out.res, out.rres)
        ctx.f_shape, ctx.f_dtype = F.shape, F.dtype
        return out.base, out.rect

    @staticmethod
    @once_differentiable
    def backward(ctx, g_base: torch.Tensor, g_rect: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        coef, res, rres = ctx.saved_tensors
        dF = _grad(coef, res, rres, g_base, g_rect, ctx.f_dtype).view(ctx.f_shape)
        return dF, None, None


def twinflow_loss_triton(F: torch.Tensor, target: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                         adv: torch.Tensor, loss_rows: torch.Tensor, *, v_c: Optional[torch.Tensor] = None,
                         v_u: Optional[torch.Tensor] = None, rcgm_acc: Optional[torch.Tensor] = None,
                         rect_diff: Optional[torch.Tensor] = None, enhanced_ratio: float,
                         enhanced_range: tuple[float, float], guide_replace: bool, rcgm_delta: float,
                         loss_type: str, loss_c: float, loss_alpha: float,
                         dist_match_cof: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Base loss (§3.8) and rectification loss (§3.9, scaled by ``dist_match_cof``) of one step, fused.

    Tensors as :func:`twinflow.method.loss_math.twinflow_loss_reference`; the scalars are the fields of
    its ``LossArithmetic`` (``loss_type``, ``loss_c``, ``loss_alpha``: its ``loss`` config's ``type``,
    ``c``, ``alpha``). Returns float32 scalars (also the zero rectification loss when ``rect_diff`` is
    None or empty) and differentiates with respect to ``F`` only. Raises
    :class:`~twinflow.kernels._common.KernelBackendError` where Triton cannot run on these tensors
    (``twinflow.method.loss_math.twinflow_loss`` chooses between this and the reference).
    """
    use_triton(F, target, t, tt, adv, loss_rows, v_c, v_u, rcgm_acc, rect_diff, backend="triton")
    _check_inputs(F, target, t, tt, adv, loss_rows, (v_c, v_u), rcgm_acc, rect_diff)
    B = F.shape[0]
    E = rect_diff.shape[0] if rect_diff is not None else 0
    rows = _Rows(
        target=_as_rows(target, B), v_c=_as_rows(v_c, B), v_u=_as_rows(v_u, B) if v_c is not None else None,
        rcgm_acc=_as_rows(rcgm_acc, B), rect_diff=_as_rows(rect_diff, E) if E else None,
        t=t.float().contiguous(), tt=tt.float().contiguous(),
        adv=adv.contiguous().view(torch.uint8), loss_rows=loss_rows.contiguous().view(torch.uint8),
    )
    settings = _Settings(
        enhanced_ratio=enhanced_ratio, enhanced_range=enhanced_range, guide_replace=guide_replace,
        rcgm_delta=rcgm_delta, loss_type=loss_type, loss_c=loss_c, loss_alpha=loss_alpha,
        dist_match_cof=dist_match_cof,
    )
    return _TwinFlowLossFn.apply(F, rows, settings)
