"""The loss arithmetic of one TwinFlow step (ALGORITHM.md §3.6–3.10), in eager PyTorch.

This is the executable form of the specification and the reference that the fused Triton loss kernel
(``twinflow.kernels.twinflow_loss``) must match; :func:`twinflow_loss` chooses between the two. The
reference takes the main prediction ``F`` and the teacher outputs the objective gathered (guidance
``v_c``/``v_u``, the RCGM integral ``acc``, the rectification difference ``v_fake - v_real``) and
returns the two scalar loss parts.

The final target is a constant for autograd: it is built from ``F.detach()`` (the RCGM target is
``F.detach() - clamp(d, -1, 1)`` with ``d`` computed from the detached prediction), so the gradient
reaches ``F`` only through the loss's prediction argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from twinflow.kernels._common import use_triton

from .config import LossFuncConfig
from .losses import per_sample_loss


@dataclass(frozen=True)
class LossArithmetic:
    """The scalar settings of the loss arithmetic, derived once from the config."""

    enhanced_ratio: float
    enhanced_range: tuple[float, float]
    # ema_decay_rate == 1 with image-free data: guided rows take v_u + enr * (v_c - v_u) outright.
    guide_replace: bool
    rcgm_delta: float
    loss: LossFuncConfig
    dist_match_cof: float


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values broadcast against a (B, ...) tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def guide_rows(t: torch.Tensor, adv: torch.Tensor, arith: LossArithmetic) -> torch.Tensor:
    """Rows whose target receives the guidance term: ``r0 < t < r1`` and not adv."""
    r0, r1 = arith.enhanced_range
    return (t > r0) & (t < r1) & ~adv


def guided_target(
    target: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor, rows: torch.Tensor, arith: LossArithmetic
) -> torch.Tensor:
    """§3.6: ``target + enr (v_c - v_u)`` on guided rows (or ``v_u + enr (v_c - v_u)`` when replacing)."""
    guidance = arith.enhanced_ratio * (v_c.float() - v_u.float())
    base = v_u.float() if arith.guide_replace else target.float()
    return torch.where(_rows(rows, target), base + guidance, target.float())


def rcgm_target(
    F: torch.Tensor, target: torch.Tensor, acc: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, delta: float
) -> torch.Tensor:
    """§3.7 step 3. ``d`` is the finite-difference estimate when ``t - tt >= delta``, else ``F - target``.

    **[deviation]** The reference's short branch ``F - acc/(t - tt) - target`` is ``0 * inf = NaN`` when
    ``t == tt``; here the short branch never divides, and ``torch.where`` never mixes the two.
    """
    F = F.detach().float()
    gap = _rows(t - tt, F)
    long = (F * gap - acc.float() - delta * target) / delta
    d = torch.where(gap >= delta, long, F - target)
    return F - d.clamp(-1.0, 1.0)


def time_weight(t: torch.Tensor, tt: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """§3.8: ``tan((1 - (|t| - |tt|)) pi / 2.5) + 1``, and 1 for adv rows."""
    w = torch.tan((1.0 - (t.abs() - tt.abs())) * (math.pi / 2.5)) + 1.0
    return torch.where(adv, torch.ones_like(w), w)


def final_target(
    F: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    tt: torch.Tensor,
    adv: torch.Tensor,
    arith: LossArithmetic,
    v_c: Optional[torch.Tensor] = None,
    v_u: Optional[torch.Tensor] = None,
    rcgm_acc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The (detached, float32) regression target of every row: guidance, then the RCGM replacement."""
    with torch.no_grad():
        out = target.float()
        if v_c is not None:
            out = guided_target(out, v_c, v_u, guide_rows(t, adv, arith), arith)
        if rcgm_acc is not None:
            rc = rcgm_target(F, out, rcgm_acc, t, tt, arith.rcgm_delta)
            out = torch.where(_rows(~adv, out), rc, out)
    return out


def twinflow_loss_reference(
    F: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    tt: torch.Tensor,
    adv: torch.Tensor,
    loss_rows: torch.Tensor,
    arith: LossArithmetic,
    v_c: Optional[torch.Tensor] = None,
    v_u: Optional[torch.Tensor] = None,
    rcgm_acc: Optional[torch.Tensor] = None,
    rect_diff: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base loss (§3.8) and rectification loss (§3.9, already scaled by ``dist_match_cof``).

    Args:
        F: main prediction (B, ...), carries the gradient.
        target: base target ``z - x`` (B, ...).
        t, tt: signed times (B,).
        adv: bool (B,), the adv rows.
        loss_rows: bool (B,), rows averaged into the base loss (all rows when ``estimate_order >= 1``,
            the mul and adv rows otherwise); the base loss is 0 when it selects nothing.
        v_c, v_u: teacher guidance outputs (B, ...), or None when guidance is off. Only guided rows are read.
        rcgm_acc: the RCGM teacher integral (B, ...), or None when the RCGM target is off. Adv rows unread.
        rect_diff: ``v_fake - v_real`` for the e2e rows, which are the first ``len(rect_diff)`` rows of the
            batch (the e2e group comes first), or None when rectification is off.
    """
    y = final_target(F, target, t, tt, adv, arith, v_c, v_u, rcgm_acc)
    per_row = per_sample_loss(F, y, arith.loss) * time_weight(t.float(), tt.float(), adv)
    count = loss_rows.sum()
    # where, not a product: a non-finite value in an unselected row must not reach the mean
    base = torch.where(loss_rows, per_row, torch.zeros_like(per_row)).sum() / count.clamp(min=1)
    if rect_diff is None or rect_diff.shape[0] == 0:
        return base, torch.zeros((), device=F.device, dtype=torch.float32)
    F_e = F[: rect_diff.shape[0]]
    dv = rect_diff.float().clamp(-1.0, 1.0)
    rect = per_sample_loss(F_e, F_e.detach().float() - dv, arith.loss).mean() * arith.dist_match_cof
    return base, rect


def twinflow_loss(F: torch.Tensor, target: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, adv: torch.Tensor,
                  loss_rows: torch.Tensor, arith: LossArithmetic, v_c: Optional[torch.Tensor] = None,
                  v_u: Optional[torch.Tensor] = None, rcgm_acc: Optional[torch.Tensor] = None,
                  rect_diff: Optional[torch.Tensor] = None, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`twinflow_loss_reference`, or the fused Triton kernel where ``backend`` ("auto", "triton" or
    "eager", see :func:`twinflow.kernels._common.use_triton`) selects it. The kernel takes the fields of
    ``arith`` as keyword scalars; it returns float32 scalars and differentiates with respect to ``F`` only."""
    if not use_triton(F, target, t, tt, adv, loss_rows, v_c, v_u, rcgm_acc, rect_diff, backend=backend):
        return twinflow_loss_reference(F, target, t, tt, adv, loss_rows, arith,
                                       v_c=v_c, v_u=v_u, rcgm_acc=rcgm_acc, rect_diff=rect_diff)
    from twinflow.kernels.twinflow_loss import twinflow_loss_triton  # imports triton: only when it runs

    return twinflow_loss_triton(
        F, target, t, tt, adv, loss_rows, v_c=v_c, v_u=v_u, rcgm_acc=rcgm_acc, rect_diff=rect_diff,
        enhanced_ratio=arith.enhanced_ratio,
        enhanced_range=arith.enhanced_range,
        guide_replace=arith.guide_replace,
        rcgm_delta=arith.rcgm_delta,
        loss_type=arith.loss.type,
        loss_c=arith.loss.c,
        loss_alpha=arith.loss.alpha,
        dist_match_cof=arith.dist_match_cof,
    )
