"""Which teacher a run uses (ALGORITHM.md §3.5): its :class:`TeacherKind` and the model's layout.

| model | ``ema_decay_rate`` 0 (online) | in (0, 1) (EMA) | 1 (frozen) |
|---|---|---|---|
| plain module | the model | :class:`CopyEMATeacher` (a full copy) | :class:`FrozenTeacher` (a full copy) |
| plain, LoRA | the model | ``AdapterEMATeacher`` (the ``ema`` adapter) | base model, adapters disabled |
| ZeRO-3, full | the engine | :class:`ShardEMATeacher` (EMA shards) | :class:`FrozenShardTeacher` (start shards) |
| ZeRO-3, LoRA | the engine | as plain LoRA, + ``LoraTeacherState``, :class:`ReleasingTeacher` | as plain LoRA, + :class:`ReleasingTeacher` |

ZeRO-3 LoRA: the EMA adapter's weights are frozen partitioned parameters, updated in place on their
shards; small ones are *persistent* (kept gathered), so after each update the gathered copies are
released (:class:`ReleasingTeacher`) and re-gathered from the new shards on next use.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import DelegatingTeacher, OnlineTeacher, Teacher, TeacherKind
from .dense import CopyEMATeacher, FrozenTeacher
from .zero3 import FrozenShardTeacher, ShardEMATeacher


class ReleasingTeacher(DelegatingTeacher):
    """Wraps a teacher that writes ZeRO-3 shards in :meth:`update` and drops stale gathered copies after."""

    def __init__(self, inner: Teacher, optimizer: Any):
        super().__init__(inner)
        self.optimizer = optimizer

    def update(self) -> None:
        self.inner.update()
        self.optimizer.empty_partition_cache()


def build_teacher(model: nn.Module, ema_decay_rate: float, backend: str = "auto", *, lora: bool = False) -> Teacher:
    """The teacher for a module that is not ZeRO-3 partitioned; ``lora``: its trainable weights are peft
    adapters ``default`` and (for an EMA) ``ema``, and the teacher keeps no copy of the model."""
    kind = TeacherKind.from_decay_rate(ema_decay_rate)
    if kind is TeacherKind.ONLINE:
        return OnlineTeacher(model)
    if lora:
        from .adapter import AdapterEMATeacher, DisabledAdapterTeacher

        if kind is TeacherKind.FROZEN:
            return DisabledAdapterTeacher(model)
        return AdapterEMATeacher(model, ema_decay_rate, backend=backend)
    if kind is TeacherKind.FROZEN:
        return FrozenTeacher(model)
    return CopyEMATeacher(model, ema_decay_rate, backend=backend)


def build_run_teacher(
    *, online: Any, module: nn.Module, optimizer: Any, lora: bool, ema_decay_rate: float, backend: str
) -> Teacher:
    """The teacher for a ZeRO-3 run. ``online`` is the callable the objective trains (the DeepSpeed
    engine), ``module`` the backbone module inside it, ``optimizer`` DeepSpeed's ZeRO-3 optimizer."""
    kind = TeacherKind.from_decay_rate(ema_decay_rate)
    if kind is TeacherKind.ONLINE:
        return OnlineTeacher(online)
    if lora:
        teacher = build_teacher(module, ema_decay_rate, backend=backend, lora=True)
        if kind is TeacherKind.EMA:
            from .adapter import LoraTeacherState

            teacher = LoraTeacherState(teacher, module)
        return ReleasingTeacher(teacher, optimizer)
    if kind is TeacherKind.FROZEN:
        return FrozenShardTeacher(online, module, optimizer)
    return ShardEMATeacher(online, module, optimizer, ema_decay_rate, backend=backend)
