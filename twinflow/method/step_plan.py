"""Which passes one training step runs, on which rows and with which weights, decided once from the config.

:meth:`StepPlan.from_config` reads the method keys; :class:`~twinflow.method.objective.TwinFlowObjective`
runs what the plan says, and the memory plan sizes the largest no-grad pass from the same answers
(:meth:`StepPlan.forwards`), so the two cannot drift apart. Two passes also need rows the batch split may
not have: RCGM runs only when some row is e2e, any or one, rectification only when some row is e2e.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TwinFlowConfig
from .groups import GroupSplit
from .teachers import TeacherKind


@dataclass(frozen=True)
class StepPlan:
    """The passes of one step (ALGORITHM.md §3). See :mod:`twinflow.method.objective` for their order."""

    teacher: TeacherKind
    # use_image_free: one-step fakes of the online model replace the whole batch.
    image_free: bool
    # enhanced_ratio != 0: teacher cond + uncond velocities on the guided rows (§3.6).
    guidance: bool
    # estimate_order >= 1 and consistc_ratio != 0: N no-grad Euler steps over the non-adv rows (§3.7).
    rcgm: bool
    rcgm_steps: int
    # consistc_ratio == 1 and dist_match_cof != 0: fake and real online velocities on e2e rows (§3.9).
    rectification: bool
    # estimate_order >= 1: the base loss averages over every row, else over mul and adv rows only.
    loss_on_all_rows: bool

    @classmethod
    def from_config(cls, cfg: TwinFlowConfig) -> "StepPlan":
        return cls(
            teacher=TeacherKind.from_decay_rate(cfg.ema_decay_rate),
            image_free=bool(cfg.use_image_free),
            guidance=cfg.enhanced_ratio != 0,
            rcgm=cfg.estimate_order >= 1 and cfg.consistc_ratio != 0,
            rcgm_steps=cfg.estimate_order,
            rectification=cfg.consistc_ratio == 1.0 and cfg.dist_match_cof != 0,
            loss_on_all_rows=cfg.estimate_order >= 1,
        )

    @property
    def rcgm_on_online(self) -> bool:
        """A frozen teacher's RCGM integration runs on the online model (§3.7), outside the teacher
        session, whose weights may be swapped into the same module in place."""
        return self.teacher is TeacherKind.FROZEN

    @property
    def guide_replace(self) -> bool:
        """A frozen teacher with image-free data: guided rows take ``v_u + enr (v_c - v_u)`` outright."""
        return self.teacher is TeacherKind.FROZEN and self.image_free

    def runs_rcgm(self, split: GroupSplit) -> bool:
        s = split.sizes
        return self.rcgm and (s["e2e"] + s["any"] + s["one"]) > 0

    def runs_rectification(self, split: GroupSplit) -> bool:
        return self.rectification and split.sizes["e2e"] > 0

    def rcgm_on_teacher(self, split: GroupSplit) -> bool:
        return self.runs_rcgm(split) and not self.rcgm_on_online

    def needs_teacher_session(self, split: GroupSplit) -> bool:
        """Whether a teacher pass runs. A session may swap weights and release gathered parameters
        (ZeRO-3), so it is entered only then (never, e.g., for the flow-matching preset)."""
        return self.guidance or self.rcgm_on_teacher(split)

    def forwards(self, split: GroupSplit) -> dict[str, tuple[int, int]]:
        """``{pass: (forwards, rows of each)}`` for the passes a step runs on ``split``, in their order.

        Guidance gives its most rows (every non-adv row guided, times two for cond and uncond); a step
        guides only the rows whose time lies in ``enhanced_range`` and skips the pass when there are none.
        """
        sizes = split.sizes
        batch = sum(sizes.values())
        non_adv = batch - sizes["adv"]
        out: dict[str, tuple[int, int]] = {}
        if self.image_free:
            out["image_free"] = (1, batch)
        if sizes["adv"]:
            out["adv_fake"] = (1, sizes["adv"])
        out["main"] = (1, batch)
        if self.guidance and non_adv:
            out["guidance"] = (1, 2 * non_adv)
        if self.runs_rcgm(split):
            out["rcgm"] = (self.rcgm_steps, non_adv)
        if self.runs_rectification(split):
            out["rectification"] = (1, 2 * sizes["e2e"])
        return out

    def largest_no_grad_rows(self, split: GroupSplit) -> int:
        """Rows of the largest forward without grad (every pass but the main one); 0 when there is none."""
        return max((rows for name, (_, rows) in self.forwards(split).items() if name != "main"), default=0)
