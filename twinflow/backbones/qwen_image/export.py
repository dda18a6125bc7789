"""Qwen-Image's export layout (written by ``twinflow.training.export``).

Full models: the transformer's ``save_pretrained`` (safetensors), loadable with
``TwinFlowQwenImageTransformer.from_pretrained``; the published TwinFlow-Qwen-Image weights use the same
key names (``time_text_embed_2``). LoRA: the adapter in diffusers' Qwen-Image LoRA format under ``lora/``
(``pipe.load_lora_weights`` / ``transformer.load_lora_adapter``; pass ``use_safetensors=True``, else
diffusers looks for a pickled ``.bin``), plus, with ``merge_lora``, the merged transformer under
``transformer/``. The transformer is built on the ``meta`` device and the weights assigned, so a 20B
model is never initialised twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import QwenImageBackboneConfig


def plain_transformer(transformer_config: Mapping[str, Any], model_config: QwenImageBackboneConfig, *,
                      cls: Any = None, inject: Any = None) -> nn.Module:
    """The transformer (with LoRA layers when configured) on the meta device, weights unset. ``cls`` and
    ``inject`` (the LoRA injection) default to Qwen-Image's; another backbone passes its own."""
    from .lora import add_lora
    from .transformer import TwinFlowQwenImageTransformer

    cls, inject = cls or TwinFlowQwenImageTransformer, inject or add_lora
    with torch.device("meta"):
        transformer = cls.from_config(transformer_config)
        if model_config.lora.enabled:
            inject(transformer, model_config.lora)
    return transformer


def write_transformer(state: dict[str, torch.Tensor], transformer_config: Mapping[str, Any],
                      model_config: QwenImageBackboneConfig, folder: Path, *, weights: str, merge_lora: bool) -> None:
    """Write ``state`` (the transformer's full state dict) into ``folder`` (see the module docstring)."""
    from diffusers import QwenImagePipeline

    save_transformer(plain_transformer(transformer_config, model_config), state, model_config, folder,
                     pipeline=QwenImagePipeline, weights=weights, merge_lora=merge_lora)


def save_transformer(transformer: nn.Module, state: dict[str, torch.Tensor], model_config: Any, folder: Path, *,
                     pipeline: Any, weights: str, merge_lora: bool) -> None:
    """``state`` assigned to ``transformer`` (meta, from :func:`plain_transformer` or another backbone's)
    and written: ``save_pretrained``, or the adapter in ``pipeline``'s LoRA format (+ the merged model)."""
    from twinflow.method.teachers.adapter import ADAPTER, EMA_ADAPTER

    dtype = model_config.torch_dtype
    transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if not model_config.lora.enabled:
        transformer.save_pretrained(str(folder), safe_serialization=True)
        return
    from peft.utils import get_peft_model_state_dict

    adapter = EMA_ADAPTER if weights == "ema" else ADAPTER
    # The pipeline's LoRA format (keys prefixed ``transformer.``, peft config in the metadata):
    # ``QwenImagePipeline.load_lora_weights(dir)`` and ``transformer.load_lora_adapter(dir)`` read it.
    pipeline.save_lora_weights(
        str(folder / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict(),
    )
    if merge_lora:
        transformer.fuse_lora(adapter_names=[adapter])
        transformer.unload_lora()
        transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
