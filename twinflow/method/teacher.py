"""Teachers: which weights the objective's no-grad teacher passes run with (ALGORITHM.md §3.5).

* ``ema_decay_rate`` in (0, 1): an EMA of the online weights (:class:`CopyEMATeacher` here for plain
  modules; the ZeRO-3 trainer and the LoRA wrapper provide shard- and adapter-based EMAs with the same
  interface).
* ``ema_decay_rate == 0``: the online model itself (:class:`OnlineTeacher`).
* ``ema_decay_rate == 1``: a frozen copy of the starting weights (:class:`FrozenTeacher`; LoRA uses the
  base model with adapters disabled).

The objective enters :meth:`Teacher.session` once per training step around all teacher passes, so an
implementation that swaps weights in and out pays for it once per step. The trainer calls
:meth:`Teacher.update` once per optimizer step (never per micro-batch).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .ema_schedule import EMADecaySchedule

Backbone = Callable[..., torch.Tensor]


class Teacher:
    """Base teacher: runs with the online model's weights; nothing to update or save."""

    def __init__(self, model: Backbone):
        self.model = model

    @contextmanager
    def session(self) -> Iterator[Backbone]:
        """Yields a backbone callable ``F(x_t, t, tt, cond)`` that runs with the teacher's weights."""
        with torch.no_grad():
            yield self.model

    def update(self) -> None:
        """Called once per optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OnlineTeacher(Teacher):
    """``ema_decay_rate == 0``: the teacher is the online model."""


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
    """A float32 EMA held in a full copy of a plain (non-partitioned) module.

    Suitable for small models and tests; the ZeRO-3 trainer keeps EMA shards instead of a copy.
    """

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


def build_teacher(model: nn.Module, ema_decay_rate: float, backend: str = "auto") -> Teacher:
    """The teacher for a plain module, chosen by ``ema_decay_rate``."""
    if ema_decay_rate == 0.0:
        return OnlineTeacher(model)
    if ema_decay_rate == 1.0:
        return FrozenTeacher(model)
    return CopyEMATeacher(model, ema_decay_rate, backend=backend)
