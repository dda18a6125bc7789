"""Which teacher a run uses (ALGORITHM.md §3.5), chosen from the config and the engine's layout.

| model (ZeRO-3) | ``ema_decay_rate`` 0 | in (0, 1) | 1 |
|---|---|---|---|
| full | online | :class:`ShardEMATeacher` (EMA shards) | :class:`FrozenShardTeacher` (start shards) |
| LoRA | online | ``AdapterEMATeacher`` (the ``ema`` adapter) | base model, adapters disabled |

LoRA: the EMA adapter's weights are frozen partitioned parameters, updated in place on their shards;
small ones are *persistent* (kept gathered), so after each update the gathered copies are released
(:class:`ReleasingTeacher`) and re-gathered from the new shards on next use.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from twinflow.method.teacher import OnlineTeacher, Teacher

from .zero_ema import FrozenShardTeacher, ShardEMATeacher


class DelegatingTeacher(Teacher):
    """Forwards everything to ``inner``; subclasses add one behaviour each."""

    def __init__(self, inner: Teacher):
        super().__init__(inner.model)
        self.inner = inner

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        with self.inner.session() as model:
            yield model

    def update(self) -> None:
        self.inner.update()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class ReleasingTeacher(DelegatingTeacher):
    """Wraps a teacher that writes ZeRO-3 shards in :meth:`update` and drops stale gathered copies after."""

    def __init__(self, inner: Teacher, optimizer: Any):
        super().__init__(inner)
        self.optimizer = optimizer

    def update(self) -> None:
        self.inner.update()
        self.optimizer.empty_partition_cache()


class LoraTeacherState(DelegatingTeacher):
    """Adds the ``ema`` adapter's weights (this rank's shards) to a LoRA EMA teacher's state: they are
    frozen parameters, so the optimizer state does not hold them."""

    def __init__(self, inner: Teacher, module: nn.Module):
        from twinflow.backbones.qwen_image.lora import adapter_pairs

        super().__init__(inner)
        self._ema_params = [ema for ema, _ in adapter_pairs(module)]

    def state_dict(self) -> dict[str, Any]:
        from twinflow.backbones.qwen_image.partitioned import local_tensor

        return {"inner": self.inner.state_dict(), "ema_adapter": [local_tensor(p) for p in self._ema_params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from twinflow.backbones.qwen_image.partitioned import local_tensor

        self.inner.load_state_dict(state["inner"])
        saved = state["ema_adapter"]
        if len(saved) != len(self._ema_params):
            raise ValueError(f"checkpoint holds {len(saved)} EMA adapter tensors, the model has {len(self._ema_params)}")
        with torch.no_grad():
            for p, value in zip(self._ema_params, saved):
                local_tensor(p).copy_(value.view_as(local_tensor(p)))


def build_run_teacher(
    *, online: Any, module: nn.Module, optimizer: Any, lora: bool, ema_decay_rate: float, backend: str
) -> Teacher:
    """The teacher for a run. ``online`` is the callable the objective trains (the DeepSpeed engine),
    ``module`` the backbone module inside it, ``optimizer`` DeepSpeed's ZeRO-3 optimizer."""
    if ema_decay_rate == 0.0:
        return OnlineTeacher(online)
    if lora:
        from twinflow.backbones.qwen_image.lora import AdapterEMATeacher, build_lora_teacher

        teacher = build_lora_teacher(module, ema_decay_rate, backend=backend)
        if isinstance(teacher, AdapterEMATeacher):
            teacher = LoraTeacherState(teacher, module)
        return ReleasingTeacher(teacher, optimizer)
    if ema_decay_rate == 1.0:
        return FrozenShardTeacher(online, module, optimizer)
    return ShardEMATeacher(online, module, optimizer, ema_decay_rate, backend=backend)
