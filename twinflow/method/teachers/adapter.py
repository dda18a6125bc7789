"""Teachers for a model carrying peft adapters: an EMA adapter, or the base model with adapters off.

Two adapters of the same shape are injected by the backbone (for Qwen-Image,
``twinflow.backbones.qwen_image.lora``): ``default`` (trained) and ``ema`` (ALGORITHM.md §3.5: the EMA
of the trainable adapter, the teacher for ``0 < ema_decay_rate < 1``). ``ema_decay_rate == 1`` uses the
base model with adapters disabled, ``0`` the online model. Nothing here depends on the backbone: the
adapters are found through peft's module structure.

Switching adapters for a teacher pass: peft's ``set_adapter`` / ``enable_adapters`` also flip
``requires_grad`` (the active adapter becomes trainable, the others frozen), which would make the EMA
trainable and freeze the trained adapter under the optimizer's feet. The teachers here therefore flip
only peft's active-adapter / disabled flags on every tuner layer and restore them afterwards.

The EMA itself is float32. Adapter weights live in the model's dtype; when that is not float32 the
teacher keeps float32 masters and writes the rounded EMA into the ``ema`` adapter (the kernel's
``shadow``). Under ZeRO-3 both are this rank's shards (default and ema weights of equal shape are
partitioned identically, so the element-wise EMA needs no gather).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from twinflow.utils.partitioned import local_tensor
from twinflow.method.ema_schedule import EMADecaySchedule

from .base import DelegatingTeacher, Teacher

ADAPTER = "default"
EMA_ADAPTER = "ema"


def _tuner_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def adapter_pairs(
    model: nn.Module, src: str = ADAPTER, dst: str = EMA_ADAPTER
) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(dst_param, src_param)`` for every weight of adapter ``src`` that adapter ``dst`` mirrors,
    found through peft's module structure (LoRA matrices and ``modules_to_save`` copies)."""
    pairs = []
    for module in _tuner_modules(model):
        if isinstance(module, ModulesToSaveWrapper):
            containers = [module.modules_to_save]
        elif isinstance(module, BaseTunerLayer):
            containers = [getattr(module, name) for name in module.adapter_layer_names]
        else:
            continue
        for container in containers:
            if src not in container:
                continue
            if dst not in container:
                hint = " (set lora.ema_adapter: true)" if dst == EMA_ADAPTER else ""
                raise ValueError(f"adapter {dst!r} is missing on a module that has adapter {src!r}{hint}")
            a, b = container[dst], container[src]
            if isinstance(a, nn.Parameter):
                pairs.append((a, b))
            else:
                pairs.extend(zip(a.parameters(), b.parameters()))
    return pairs


@contextlib.contextmanager
def adapter_state(model: nn.Module, active: str | None) -> Iterator[None]:
    """Run the block with adapter ``active`` (``None``: adapters disabled), touching no ``requires_grad``."""
    modules = _tuner_modules(model)
    if not modules:
        raise ValueError("the model has no peft adapters")
    if any(getattr(m, "merged", False) for m in modules):
        raise RuntimeError("cannot switch adapters on a model whose LoRA weights are merged")
    saved = [(m._active_adapter, m._disable_adapters) for m in modules]
    try:
        for m in modules:
            if active is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [active]
                m._disable_adapters = False
        yield
    finally:
        for m, (names, disabled) in zip(modules, saved):
            m._active_adapter = names
            m._disable_adapters = disabled


class AdapterEMATeacher(Teacher):
    """``0 < ema_decay_rate < 1``: teacher passes run with the ``ema`` adapter, a float32 EMA of ``default``."""

    def __init__(self, model: nn.Module, decay_rate: float, backend: str = "auto"):
        super().__init__(model)
        self.schedule = EMADecaySchedule(decay_rate)
        self.backend = backend
        self._pairs = adapter_pairs(model)
        if not self._pairs:
            raise ValueError(f"the model has no {EMA_ADAPTER!r} adapter (set lora.ema_adapter: true)")
        # float32 masters for adapter weights stored in a lower precision (the adapter gets the rounding).
        self._masters = [
            None if local_tensor(e).dtype == torch.float32 else local_tensor(e).detach().float().clone()
            for e, _ in self._pairs
        ]

    @contextlib.contextmanager
    def session(self) -> Iterator[nn.Module]:
        with torch.no_grad(), adapter_state(self.model, EMA_ADAPTER):
            yield self.model

    @torch.no_grad()
    def update(self) -> None:
        from twinflow.kernels.ema import ema_update_

        decay = self.schedule.next_decay()
        # Storage is looked up per update: DeepSpeed may re-point a parameter's shard between steps.
        direct, mastered = [], []
        for (ema, src), master in zip(self._pairs, self._masters):
            if master is None:
                direct.append((local_tensor(ema), local_tensor(src)))
            else:
                mastered.append((master, local_tensor(src), local_tensor(ema)))
        if direct:
            ema_update_([e for e, _ in direct], [s for _, s in direct], decay, backend=self.backend)
        if mastered:
            ema_update_([m for m, _, _ in mastered], [s for _, s, _ in mastered], decay,
                        shadow=[e for _, _, e in mastered], backend=self.backend)

    def state_dict(self) -> dict[str, Any]:
        """The schedule and the float32 masters; the ``ema`` adapter weights are in the model's state."""
        return {"schedule": self.schedule.state_dict(), "masters": [m for m in self._masters if m is not None]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        masters = iter(state["masters"])
        for m in self._masters:
            if m is not None:
                m.copy_(next(masters))


class DisabledAdapterTeacher(Teacher):
    """``ema_decay_rate == 1``: the base model (the starting weights) with every adapter disabled."""

    @contextlib.contextmanager
    def session(self) -> Iterator[nn.Module]:
        with torch.no_grad(), adapter_state(self.model, None):
            yield self.model


class LoraTeacherState(DelegatingTeacher):
    """Adds the ``ema`` adapter's weights (this rank's shards) to a LoRA EMA teacher's state: they are
    frozen parameters, so the optimizer state does not hold them."""

    def __init__(self, inner: Teacher, module: nn.Module):
        super().__init__(inner)
        self._ema_params = [ema for ema, _ in adapter_pairs(module)]

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "ema_adapter": [local_tensor(p) for p in self._ema_params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        saved = state["ema_adapter"]
        if len(saved) != len(self._ema_params):
            raise ValueError(f"checkpoint holds {len(saved)} EMA adapter tensors, the model has {len(self._ema_params)}")
        with torch.no_grad():
            for p, value in zip(self._ema_params, saved):
                local_tensor(p).copy_(value.view_as(local_tensor(p)))
