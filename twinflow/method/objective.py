"""One TwinFlow training step (ALGORITHM.md §3), independent of the backbone.

A backbone is any callable ``F(x_t, t, tt, cond) -> velocity`` (signed times of shape (B,)). The step
runs, in this order and with these costs (batch B, all groups on, N = 2):

1. adv rows: one-step fakes from the online model (no grad, B/4 rows); image-free mode: the whole batch.
2. the main forward (B rows, with grad).
3. inside one teacher session: guidance, cond and uncond in ONE batched forward (2 x guided rows), then
   the RCGM integration, N forwards over the non-adv rows.
4. rectification: fake and real passes of the online model in ONE batched forward (2 x e2e rows).
5. the loss arithmetic, eager or fused (``kernels`` switch), giving the base and rectification parts.

Which passes run is decided once from the config (:class:`~twinflow.method.step_plan.StepPlan`).
Rows that a pass would discard are never computed (adv rows skip RCGM, unguided rows skip guidance);
the values of the rows that are used are exactly those of the specification. One exception keeps ranks
in step: with several ranks, a rank without guided rows still runs the guidance forward on one row,
since a ZeRO-3 forward is a collective and another rank may have guided rows.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .conditioning import cat_conditions, index_condition
from .config import TwinFlowConfig
from .groups import GroupSplit, split_batch
from .loss_math import LossArithmetic, guide_rows, guided_target, twinflow_loss, twinflow_loss_reference
from .step_plan import StepPlan
from .teachers import Teacher
from .times import StepTimes, assign_group_times, sample_base_times

Backbone = Callable[..., torch.Tensor]


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def invert(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted data and noise from a velocity: ``x_t - |t| F`` and ``x_t + (1 - |t|) F``."""
    s = _rows(t.abs().to(x_t.dtype), x_t)
    return x_t - s * F, x_t + (1 - s) * F


@torch.no_grad()
def one_step_sample(model: Backbone, noise: torch.Tensor, cond: Any) -> torch.Tensor:
    """The model's one-step sample from pure noise: ``x_hat`` of ``F(z, 1, 0)``."""
    b = noise.shape[0]
    t = torch.ones(b, device=noise.device)
    F = model(noise, t, torch.zeros_like(t), cond)
    return invert(noise, t, F)[0].detach()


def _several_ranks() -> bool:
    """Whether this process is one of several ranks (a local question: no collective)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class StepOutput:
    """The loss to back-propagate, its parts, and what the step did (for logging and tests)."""

    loss: torch.Tensor
    base_loss: torch.Tensor
    rect_loss: torch.Tensor
    split: GroupSplit
    times: StepTimes
    forward_rows: dict[str, int] = field(default_factory=dict)


class TwinFlowObjective:
    """Computes the TwinFlow loss of one micro batch."""

    def __init__(self, config: TwinFlowConfig):
        self.config = config
        self.plan = StepPlan.from_config(config)
        self.arith = LossArithmetic(
            enhanced_ratio=config.enhanced_ratio,
            enhanced_range=config.enhanced_range,
            guide_replace=self.plan.guide_replace,
            rcgm_delta=config.rcgm_delta,
            loss=config.loss_func,
            dist_match_cof=config.dist_match_cof,
        )
        self._loss_impl = self._select_loss_impl(config.kernels)

    @staticmethod
    def _select_loss_impl(kernels: str):
        if kernels == "eager":
            return twinflow_loss_reference
        try:
            import twinflow.kernels.twinflow_loss  # noqa: F401  (fails here, not mid-step, without Triton)
        except ImportError as e:
            if kernels == "triton":
                raise RuntimeError(f"method.kernels=triton but the fused loss kernel is unavailable: {e}") from e
            return twinflow_loss_reference
        return functools.partial(twinflow_loss, backend=kernels)

    def split(self, batch_size: int) -> GroupSplit:
        return split_batch(batch_size, self.config.probs.as_dict())

    def training_step(
        self, model: Backbone, x: torch.Tensor, cond: Any, uncond: Any, teacher: Teacher
    ) -> StepOutput:
        """Loss of one micro batch. ``model`` is the online backbone (with grad); ``uncond`` holds
        the unconditional condition for the same rows (needed when ``enhanced_ratio != 0``)."""
        cfg, plan = self.config, self.plan
        B = x.shape[0]
        split = self.split(B)
        sl = split.slices
        masks = split.masks(x.device)
        adv = masks["adv"]
        rows_run: dict[str, int] = {}

        if plan.guidance and uncond is None:
            raise ValueError("enhanced_ratio != 0 needs an unconditional condition (uncond) for the guided target")

        with torch.no_grad():
            if plan.image_free:
                x = one_step_sample(model, torch.randn_like(x), cond)
                rows_run["image_free"] = B
            t0, tt0, t_min = sample_base_times(B, cfg.time_dist_ctrl, cfg.consistc_ratio, x.device)
            times = assign_group_times(t0, tt0, t_min, split)
            n_adv = split.sizes["adv"]
            if n_adv:
                fake = one_step_sample(model, torch.randn_like(x[sl["adv"]]), index_condition(cond, sl["adv"]))
                x = torch.cat([x[: sl["adv"].start], fake, x[sl["adv"].stop :]])
                rows_run["adv_fake"] = n_adv
            # Path arithmetic in float32 whatever the data dtype: with bf16 latents, rounding |t| or the
            # RCGM start point x_t - delta * target to bf16 would distort the delta-scale differences.
            z = torch.randn_like(x).float()
            x32 = x.float()
            s = _rows(times.t.abs(), x32)
            x_t = s * z + (1 - s) * x32
            target = z - x32

        F = model(x_t.to(x.dtype), times.t, times.tt, cond)
        rows_run["main"] = B
        x_hat_main = invert(x_t, times.t, F.detach().float())[0]

        v_c = v_u = acc = None
        use_rcgm = plan.runs_rcgm(split)
        guided = target
        with teacher.session() if plan.needs_teacher_session(split) else nullcontext() as teacher_model:
            if plan.guidance:
                rows = guide_rows(times.t, adv, self.arith)
                v_c, v_u = self._guidance(teacher_model, x_t, times.t, cond, uncond, rows, target, x.dtype)
                rows_run["guidance"] = 2 * int(rows.sum())
                guided = guided_target(target, v_c, v_u, rows, self.arith)
            if plan.rcgm_on_teacher(split):
                acc = self._rcgm_integral(teacher_model, x_t, guided, times, cond, ~adv, x.dtype)
        if use_rcgm and plan.rcgm_on_online:
            acc = self._rcgm_integral(model, x_t, guided, times, cond, ~adv, x.dtype)
        if use_rcgm:
            rows_run["rcgm"] = plan.rcgm_steps * int((~adv).sum())

        rect_diff = None
        n_e2e = split.sizes["e2e"]
        if plan.runs_rectification(split):
            rect_diff = self._rectification(model, x_hat_main[sl["e2e"]].to(x.dtype), index_condition(cond, sl["e2e"]))
            rows_run["rectification"] = 2 * n_e2e

        loss_rows = torch.ones_like(adv) if plan.loss_on_all_rows else (masks["mul"] | adv)
        base, rect = self._loss_impl(
            F, target, times.t, times.tt, adv, loss_rows, self.arith,
            v_c=v_c, v_u=v_u, rcgm_acc=acc, rect_diff=rect_diff,
        )
        return StepOutput(
            loss=base + rect, base_loss=base.detach(), rect_loss=rect.detach(), split=split, times=times,
            forward_rows=rows_run,
        )

    @torch.no_grad()
    def _guidance(self, teacher_model, x_t, t, cond, uncond, rows, target, dtype):
        """§3.6: teacher velocities with and without the condition, one batched forward, guided rows only."""
        v_c = torch.zeros_like(target)
        v_u = torch.zeros_like(target)
        idx = rows.nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            if not _several_ranks():
                return v_c, v_u
            # Another rank may have guided rows. Under ZeRO-3 every forward gathers the teacher's parameters
            # collectively, so a rank without rows runs the forward on row 0 and discards it: skipping it left
            # the other rank waiting in its gather (a 2-rank SD3.5 LoRA run hung in step 4 that way). Always
            # running it costs a one-row forward on the rare step without guided rows; asking the other
            # ranks first would cost an all-reduce and a host sync on every step.
            _ = teacher_model(x_t[:1].to(dtype), t[:1], t[:1], index_condition(cond, slice(0, 1)))
            return v_c, v_u
        xs = x_t[idx].to(dtype)
        ts = t[idx]
        both = teacher_model(
            torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([ts, ts]),
            cat_conditions([index_condition(cond, idx), index_condition(uncond, idx)]),
        ).float()
        v_c[idx] = both[:n]
        v_u[idx] = both[n:]
        return v_c, v_u

    @torch.no_grad()
    def _rcgm_integral(self, teacher_model, x_t, target, times: StepTimes, cond, rows, dtype) -> torch.Tensor:
        """§3.7 steps 1–2: N Euler steps of the teacher from ``max(t - delta, tt)`` to ``tt``."""
        N, delta = self.config.estimate_order, self.config.rcgm_delta
        acc = torch.zeros_like(target)
        idx = rows.nonzero().squeeze(1)
        if idx.numel() == 0:
            return acc
        t, tt = times.t[idx].float(), times.tt[idx].float()
        c = index_condition(cond, idx)
        x_cur = x_t[idx] - delta * target[idx]
        t_m = torch.maximum(t - delta, tt)
        part = torch.zeros_like(target[idx])
        for i in range(N):
            s_i = t_m * (1 - i / N) + tt * (i / N)
            s_n = t_m * (1 - (i + 1) / N) + tt * ((i + 1) / N)
            F_i = teacher_model(x_cur.to(dtype), s_i, s_n, c).float()
            x_hat, z_hat = invert(x_cur, s_i, F_i)
            sn = _rows(s_n.abs(), x_cur)
            x_cur = sn * z_hat + (1 - sn) * x_hat
            part += F_i * _rows(s_i - s_n, part)
        acc[idx] = part
        return acc

    @torch.no_grad()
    def _rectification(self, model, x_e, cond_e) -> torch.Tensor:
        """§3.9: ``v_fake - v_real`` at a random point between fresh noise and the one-step samples."""
        n = x_e.shape[0]
        z = torch.randn_like(x_e)
        sigma = torch.rand(n, device=x_e.device)
        sg = _rows(sigma.to(x_e.dtype), x_e)
        x_s = sg * z + (1 - sg) * x_e
        t_both = torch.cat([-sigma, sigma])
        v = model(torch.cat([x_s, x_s]), t_both, t_both, cat_conditions([cond_e, cond_e]))
        return (v[:n].float() - v[n:].float())
