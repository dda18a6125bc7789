"""LoRA for the Qwen-Image transformer through peft: which modules get adapters, and injecting them.

Two adapters of the same shape are injected: ``default`` (trained) and, with ``lora.ema_adapter``,
``ema`` (the EMA teacher's weights). The teachers that use them, and the peft helpers that pair and
switch adapters, are backbone-independent and live in :mod:`twinflow.method.teachers.adapter`.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from torch import nn

from twinflow.method.teachers.adapter import ADAPTER, EMA_ADAPTER, adapter_pairs

from .config import LoraSettings
from twinflow.utils.partitioned import gathered

TIME_EMBED_2 = "time_text_embed_2"
TIME_EMBED_2_LINEARS = [f"{TIME_EMBED_2}.timestep_embedder.linear_1", f"{TIME_EMBED_2}.timestep_embedder.linear_2"]


def lora_config(settings: LoraSettings, *, dropout: float, time_embed_2: str = TIME_EMBED_2,
                time_embed_2_linears: Sequence[str] = TIME_EMBED_2_LINEARS) -> LoraConfig:
    """The peft config of one adapter (the EMA adapter uses ``dropout=0``: teacher passes are
    deterministic; the scaling ``alpha / rank`` is the same for both). ``time_embed_2`` names the second
    time embedder and ``time_embed_2_linears`` its linears (another backbone's names: Z-Image's)."""
    targets = list(settings.target_modules)
    if settings.train_time_embed_2 == "lora":
        targets += list(time_embed_2_linears)
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[time_embed_2] if settings.train_time_embed_2 == "full" else None,
        init_lora_weights=True,
    )


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


def add_lora(transformer: nn.Module, settings: LoraSettings, **names: Any) -> None:
    """Inject the ``default`` adapter (and, with ``settings.ema_adapter``, the ``ema`` adapter, equal to
    it) into ``transformer``. Afterwards only the ``default`` adapter's weights require grad. ``names``:
    :func:`lora_config`'s embedder names, for another backbone."""
    if any(hasattr(p, "ds_id") for p in transformer.parameters()) and settings.train_time_embed_2 == "full":
        raise ValueError(
            f"config key 'lora.train_time_embed_2': 'full' copies {names.get('time_embed_2', TIME_EMBED_2)} per "
            "adapter, which cannot be done on ZeRO-3 partitioned parameters; use 'lora' or 'frozen' when building "
            "under deepspeed.zero.Init"
        )
    transformer.add_adapter(lora_config(settings, dropout=settings.dropout, **names), ADAPTER)
    _reinit_partitioned_lora(transformer, ADAPTER)
    if settings.ema_adapter:
        with warnings.catch_warnings():
            # peft warns that a second adapter is being added, which is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(lora_config(settings, dropout=0.0, **names), EMA_ADAPTER)
        pairs = adapter_pairs(transformer)
        with gathered([p for pair in pairs for p in pair], modify=True), torch.no_grad():
            for ema, src in pairs:
                ema.copy_(src)
    set_adapter(transformer, ADAPTER)
    if getattr(transformer, "fused_time_embed", None) is not None:
        transformer.bind_fused_time_embedding()
