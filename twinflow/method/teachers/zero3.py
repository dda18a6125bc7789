"""The teacher EMA under DeepSpeed ZeRO-3, kept as per-rank shards and never gathered (ALGORITHM.md §3.5).

Layout. The ZeRO-3 optimizer holds this rank's float32 master partition as a few flat tensors
(``fp32_partitioned_groups_flat``, one per sub-group); every trainable parameter's shard is a contiguous
slice ``[offset, offset + partition_numel)`` of one of them (``grad_position``). The EMA mirrors that
layout exactly: one float32 flat per sub-group, plus a *shadow* flat in the parameters' dtype (the
teacher's weights, bf16 in production). An update is therefore ONE multi-tensor call of the fused EMA
kernel over all of the rank's flats, reading the master partition and writing the EMA and the shadow in
the same pass. Memory per rank: 4 + 2 bytes per element of the rank's partition (a 1/N share), never a
full model.

Teacher passes. :class:`ShardSwapTeacher` runs them through the same partitioned model: entering
:meth:`session` points every trainable parameter's partition (``param.ds_tensor.data``) at its slice of
the shadow, leaving it points them back. ZeRO-3 all-gathers a parameter from ``ds_tensor`` whenever a
module needs it, so the teacher forwards see the EMA weights without a second model.

Stale gathered copies. ZeRO-3 keeps some parameters gathered between uses: prefetched ones (in flight
or available ahead of their module), ones released late because they are reused within
``stage3_max_reuse_distance``, and *persistent* ones (below ``stage3_param_persistence_threshold``),
which it never releases. Any of them would carry online weights into the teacher session, or EMA
weights out of it into the backward pass. The session therefore releases every gathered parameter of
the module (DeepSpeed's ``empty_partition_cache``, which also waits for in-flight gathers and includes
persistent parameters) on entry and again on exit, before the partitions are swapped back. Released
parameters are simply re-gathered, from the now-current partition, when next used; the cost is one
extra gather of the persistent parameters per session, which are small by definition. So the
persistence threshold, reuse distance and prefetch settings can stay at DeepSpeed's values.
``tests/training`` proves it with a large reuse distance and persistence threshold.

Frozen parameters (no optimizer partition) are identical in the online model and the teacher and are
left alone. hpZ secondary partitions are refused in the DeepSpeed config (gathers would read them).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from twinflow.kernels.ema import MultiTensorEMA
from twinflow.method.ema_schedule import EMADecaySchedule

from .base import Teacher


@dataclass(frozen=True)
class ShardSlot:
    """Where one trainable parameter's shard lives in the rank's flat partitions."""

    name: str
    param: nn.Parameter
    group: int
    offset: int
    numel: int


def zero3_slots(module: nn.Module, optimizer: Any) -> list[ShardSlot]:
    """The flat-partition position of every trainable parameter of ``module`` (DeepSpeed's ZeRO-3
    optimizer records it in ``grad_position`` as ``(sub_group, offset, numel)``)."""
    slots = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if not hasattr(param, "ds_tensor"):
            raise TypeError(f"parameter {name} is not ZeRO-3 partitioned; the shard EMA needs deepspeed zero_stage 3")
        group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        if numel != param.ds_tensor.numel():
            raise RuntimeError(f"parameter {name}: optimizer partition has {numel} elements, ds_tensor {param.ds_tensor.numel()}")
        slots.append(ShardSlot(name, param, int(group), int(offset), int(numel)))
    if not slots:
        raise ValueError("the model has no trainable parameters")
    return slots


class ShardSwapTeacher(Teacher):
    """A teacher whose weights are per-rank shards swapped into the partitioned model for each session.

    ``model`` is the backbone callable the objective uses (the DeepSpeed engine or its module);
    ``module`` the partitioned ``nn.Module`` and ``optimizer`` DeepSpeed's ZeRO-3 optimizer. The shadow
    flats start as a copy of the current master partition. Subclasses decide how they change.
    """

    def __init__(self, model: Any, module: nn.Module, optimizer: Any):
        super().__init__(model)
        self.module = module
        self.optimizer = optimizer
        self.slots = zero3_slots(module, optimizer)
        dtype = self.slots[0].param.ds_tensor.dtype
        self.param_device = self.slots[0].param.ds_tensor.device
        with torch.no_grad():
            self.shadow = [f.detach().to(dtype).clone() for f in self.master_flats()]

    def master_flats(self) -> list[torch.Tensor]:
        """This rank's float32 master partition, one flat tensor per optimizer sub-group (looked up on
        every call: DeepSpeed may re-point them, e.g. after loading a checkpoint)."""
        return list(self.optimizer.fp32_partitioned_groups_flat)

    def _release_gathered(self) -> None:
        self.optimizer.empty_partition_cache()

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """Runs the block with every trainable partition pointing at the shadow (see the module doc)."""
        # Blocking copy when the shadow lives elsewhere (offloaded optimizer): ZeRO-3 gathers on its own
        # stream, which must not race an unfinished host-to-device copy.
        shadows = [s.to(self.param_device) for s in self.shadow]
        originals: list[torch.Tensor] = []
        with torch.no_grad():
            self._release_gathered()
            try:
                for slot in self.slots:
                    originals.append(slot.param.ds_tensor.data)
                    slot.param.ds_tensor.data = shadows[slot.group].narrow(0, slot.offset, slot.numel)
                yield self.model
            finally:
                self._release_gathered()
                for slot, original in zip(self.slots, originals):
                    slot.param.ds_tensor.data = original

    def local_views(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter views (by name) of per-sub-group flats laid out like the master partition."""
        return {s.name: flats[s.group].narrow(0, s.offset, s.numel) for s in self.slots}


class FrozenShardTeacher(ShardSwapTeacher):
    """``ema_decay_rate == 1``: the weights the run started from, kept as shards in the model dtype.

    The shadow is part of the checkpoint, so a resumed run keeps the original starting weights."""

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {f"shadow.{i}": s for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _copy_flats(self.shadow, state["tensors"], "shadow")


class ShardEMATeacher(ShardSwapTeacher):
    """``0 < ema_decay_rate < 1``: a float32 EMA of the master partition, kept as per-rank shards.

    :meth:`update` is one fused multi-tensor kernel call per optimizer step over all sub-groups, writing
    the float32 EMA and the shadow (the EMA rounded to the parameters' dtype) in the same pass.
    """

    def __init__(self, model: Any, module: nn.Module, optimizer: Any, decay_rate: float, backend: str = "auto"):
        super().__init__(model, module, optimizer)
        with torch.no_grad():
            self.ema = [f.detach().float().clone() for f in self.master_flats()]
        self.schedule = EMADecaySchedule(decay_rate)
        self._kernel = MultiTensorEMA(ema_tensors=self.ema, shadow_tensors=self.shadow, backend=backend)

    def update(self) -> None:
        # The schedule advances only after the kernel accepted the tensors: a rejected update changes nothing.
        self._kernel.update(self.master_flats(), decay=self.schedule.decay)
        self.schedule.next_decay()

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "tensors": {f"ema.{i}": e for i, e in enumerate(self.ema)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        _copy_flats(self.ema, state["tensors"], "ema")
        with torch.no_grad():
            for shadow, ema in zip(self.shadow, self.ema):
                shadow.copy_(ema)


def _copy_flats(dst: list[torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str) -> None:
    expected = {f"{prefix}.{i}" for i in range(len(dst))}
    if set(tensors) != expected:
        raise ValueError(f"teacher state holds {sorted(tensors)}, expected {sorted(expected)}")
    with torch.no_grad():
        for i, d in enumerate(dst):
            src = tensors[f"{prefix}.{i}"]
            if src.shape != d.shape:
                raise ValueError(f"teacher state {prefix}.{i} has shape {tuple(src.shape)}, this rank holds {tuple(d.shape)}")
            d.copy_(src)
