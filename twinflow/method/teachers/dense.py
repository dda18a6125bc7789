"""Teachers for a plain (non-partitioned, adapter-free) module: a full copy of it, frozen or an EMA.

Suitable for small models, tests and benchmarks; the ZeRO-3 trainer keeps shards instead
(:mod:`.zero3`), LoRA runs keep an adapter (:mod:`.adapter`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from twinflow.method.ema_schedule import EMADecaySchedule

from .base import Teacher


class FrozenTeacher(Teacher):
    """``ema_decay_rate == 1``: a frozen copy of the weights the run started from."""

    def __init__(self, model: nn.Module):
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        super().__init__(frozen)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


class CopyEMATeacher(Teacher):
    """A float32 EMA held in a full copy of a plain (non-partitioned) module."""

    def __init__(self, model: nn.Module, decay_rate: float, backend: str = "auto"):
        ema_model = copy.deepcopy(model).requires_grad_(False).eval().float()
        super().__init__(ema_model)
        self.online = model
        self.schedule = EMADecaySchedule(decay_rate)
        self.backend = backend
        self._pairs = [
            (name, p_ema, p)
            for (name, p_ema), (_, p) in zip(ema_model.named_parameters(), model.named_parameters())
            if p.requires_grad
        ]

    @torch.no_grad()
    def update(self) -> None:
        from twinflow.kernels.ema import ema_update_

        decay = self.schedule.next_decay()
        ema_update_([e for _, e, _ in self._pairs], [p.detach() for _, _, p in self._pairs], decay, backend=self.backend)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.schedule.load_state_dict(state["schedule"])
