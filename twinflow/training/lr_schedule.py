"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay to a floor.

A ``torch.optim.lr_scheduler.LambdaLR`` handed to ``deepspeed.initialize``: DeepSpeed steps it after
each *applied* optimizer step only, so a skipped (non-finite) step does not advance it. Its state is
one integer (steps taken), stored as JSON in checkpoints; the multiplier is a pure function of it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .config import OptimConfig


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The factor applied to ``optim.lr`` for the update after ``step`` applied steps."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(max_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupDecaySchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with :func:`lr_multiplier`; ``state_dict`` is plain JSON data."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
        self._optim = optim
        self._max_steps = max_steps
        super().__init__(optimizer, lambda step: lr_multiplier(step, optim, max_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": int(self.last_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = int(state["steps"])
        self.last_epoch = steps
        self._step_count = steps + 1
        factor = lr_multiplier(steps, self._optim, self._max_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
