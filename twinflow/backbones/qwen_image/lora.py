"""LoRA for the Qwen-Image transformer through peft, with an EMA adapter and the LoRA teachers.

Two adapters of the same shape are injected: ``default`` (trained) and ``ema`` (ALGORITHM.md §3.5: the
EMA of the trainable adapter, the teacher for ``0 < ema_decay_rate < 1``). ``ema_decay_rate == 1``
uses the base model with adapters disabled, ``0`` the online model.

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
import warnings
from typing import Any, Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from twinflow.method.ema_schedule import EMADecaySchedule
from twinflow.method.teacher import OnlineTeacher, Teacher

from .config import LoraSettings
from .partitioned import gathered, local_tensor

ADAPTER = "default"
EMA_ADAPTER = "ema"
TIME_EMBED_2 = "time_text_embed_2"
TIME_EMBED_2_LINEARS = [f"{TIME_EMBED_2}.timestep_embedder.linear_1", f"{TIME_EMBED_2}.timestep_embedder.linear_2"]


def lora_config(settings: LoraSettings, *, dropout: float) -> LoraConfig:
    """The peft config of one adapter (the EMA adapter uses ``dropout=0``: teacher passes are
    deterministic; the scaling ``alpha / rank`` is the same for both)."""
    targets = list(settings.target_modules)
    if settings.train_time_embed_2 == "lora":
        targets += TIME_EMBED_2_LINEARS
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[TIME_EMBED_2] if settings.train_time_embed_2 == "full" else None,
        init_lora_weights=True,
    )


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


def _adapter_params(module: BaseTunerLayer, adapter: str) -> list[nn.Parameter]:
    """The weights of ``adapter`` in one peft tuner layer (entries are modules or parameters)."""
    params: list[nn.Parameter] = []
    for name in module.adapter_layer_names:
        container = getattr(module, name)
        if adapter in container:
            entry = container[adapter]
            params.extend([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
    return params


def _reinit_partitioned_lora(model: nn.Module, adapter: str) -> None:
    """Under ``deepspeed.zero.Init`` peft's LoRA initialisation (kaiming A, zero B) writes into empty
    partitioned tensors and is lost; redo it on gathered weights."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "reset_lora_parameters"):
            params = _adapter_params(module, adapter)
            if any(hasattr(p, "ds_id") for p in params):
                with gathered(params, modify=True):
                    module.reset_lora_parameters(adapter, init_lora_weights=True)


def add_lora(transformer: nn.Module, settings: LoraSettings) -> None:
    """Inject the ``default`` adapter (and, with ``settings.ema_adapter``, the ``ema`` adapter, equal to
    it) into ``transformer``. Afterwards only the ``default`` adapter's weights require grad."""
    if any(hasattr(p, "ds_id") for p in transformer.parameters()) and settings.train_time_embed_2 == "full":
        raise ValueError(
            "config key 'lora.train_time_embed_2': 'full' copies time_text_embed_2 per adapter, which cannot be "
            "done on ZeRO-3 partitioned parameters; use 'lora' or 'frozen' when building under deepspeed.zero.Init"
        )
    transformer.add_adapter(lora_config(settings, dropout=settings.dropout), ADAPTER)
    _reinit_partitioned_lora(transformer, ADAPTER)
    if settings.ema_adapter:
        with warnings.catch_warnings():
            # peft warns that a second adapter is being added, which is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(lora_config(settings, dropout=0.0), EMA_ADAPTER)
        pairs = adapter_pairs(transformer)
        with gathered([p for pair in pairs for p in pair], modify=True), torch.no_grad():
            for ema, src in pairs:
                ema.copy_(src)
    set_adapter(transformer, ADAPTER)
    if getattr(transformer, "fused_time_embed", None) is not None:
        transformer.bind_fused_time_embedding()


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


def build_lora_teacher(model: nn.Module, ema_decay_rate: float, backend: str = "auto") -> Teacher:
    """The teacher for a LoRA model, chosen by ``ema_decay_rate`` (0 online, 1 base model, else EMA)."""
    if ema_decay_rate == 0.0:
        return OnlineTeacher(model)
    if ema_decay_rate == 1.0:
        return DisabledAdapterTeacher(model)
    return AdapterEMATeacher(model, ema_decay_rate, backend=backend)
