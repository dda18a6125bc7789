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


def plain_transformer(transformer_config: Mapping[str, Any], model_config: QwenImageBackboneConfig,
                      transformer_cls: Any = None) -> nn.Module:
    """The transformer (with LoRA layers when configured) on the meta device, weights unset.
    ``transformer_cls``: another family's diffusers class with the same LoRA settings (default Qwen-Image's)."""
    from .lora import add_lora
    from .transformer import TwinFlowQwenImageTransformer

    with torch.device("meta"):
        transformer = (transformer_cls or TwinFlowQwenImageTransformer).from_config(transformer_config)
        if model_config.lora.enabled:
            add_lora(transformer, model_config.lora)
    return transformer


def write_transformer(state: dict[str, torch.Tensor], transformer_config: Mapping[str, Any],
                      model_config: QwenImageBackboneConfig, folder: Path, *, weights: str, merge_lora: bool,
                      transformer_cls: Any = None, pipeline_cls: Any = None) -> None:
    """Write ``state`` (the transformer's full state dict) into ``folder`` (see the module docstring).
    ``transformer_cls`` / ``pipeline_cls`` (whose ``save_lora_weights`` writes the adapter): another
    family's classes (default Qwen-Image's)."""
    from twinflow.method.teachers.adapter import ADAPTER, EMA_ADAPTER

    transformer = plain_transformer(transformer_config, model_config, transformer_cls)
    dtype = model_config.torch_dtype
    transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if not model_config.lora.enabled:
        transformer.save_pretrained(str(folder), safe_serialization=True)
        return
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    pipeline_cls = pipeline_cls or QwenImagePipeline

    adapter = EMA_ADAPTER if weights == "ema" else ADAPTER
    # The pipeline's LoRA format (keys prefixed ``transformer.``, peft config in the metadata):
    # ``QwenImagePipeline.load_lora_weights(dir)`` and ``transformer.load_lora_adapter(dir)`` read it.
    pipeline_cls.save_lora_weights(
        str(folder / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict(),
    )
    if merge_lora:
        transformer.fuse_lora(adapter_names=[adapter])
        transformer.unload_lora()
        transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
