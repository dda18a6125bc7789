"""The teacher interface and its three kinds (ALGORITHM.md §3.5).

:meth:`TeacherKind.from_decay_rate` is the one place that reads ``ema_decay_rate``'s 0 / 1 / else rule;
every builder, the step plan, export and the memory plan ask it.
"""
from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, Iterator

import torch

Backbone = Callable[..., torch.Tensor]


class TeacherKind(Enum):
    """Which weights the objective's no-grad teacher passes run with."""

    ONLINE = "online"  # ema_decay_rate == 0: the online model itself
    FROZEN = "frozen"  # ema_decay_rate == 1: the weights the run started from
    EMA = "ema"  # otherwise: an EMA of the online weights

    @classmethod
    def from_decay_rate(cls, ema_decay_rate: float) -> "TeacherKind":
        if ema_decay_rate == 0.0:
            return cls.ONLINE
        if ema_decay_rate == 1.0:
            return cls.FROZEN
        return cls.EMA


class Teacher:
    """Base teacher: runs with the online model's weights; nothing to update or save.

    The objective enters :meth:`session` once per training step around all teacher passes, so an
    implementation that swaps weights in and out pays for it once per step. The trainer calls
    :meth:`update` once per optimizer step (never per micro-batch).
    """

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
    """:attr:`TeacherKind.ONLINE`: the teacher is the online model (for every model layout)."""


class DelegatingTeacher(Teacher):
    """Forwards everything to ``inner``; subclasses add one behaviour each."""

    def __init__(self, inner: Teacher):
        super().__init__(inner.model)
        self.inner = inner

    @contextmanager
    def session(self) -> Iterator[Any]:
        with self.inner.session() as model:
            yield model

    def update(self) -> None:
        self.inner.update()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
