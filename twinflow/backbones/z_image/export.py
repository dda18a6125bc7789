"""Z-Image's export layout (written by ``twinflow.training.export``), Qwen-Image's with Z-Image's classes.

Full models: the transformer's ``save_pretrained``: ``t_embedder_2.*`` beside diffusers' keys, the
published TwinFlow-Z-Image-Turbo layout, loadable with ``TwinFlowZImageTransformer.from_pretrained``.
LoRA: the adapter in ``ZImagePipeline``'s LoRA format under ``lora/`` and, with ``merge_lora``, the merged
transformer under ``transformer/`` (what ``twinflow sample`` loads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ZImageBackboneConfig


def plain_transformer(transformer_config: Mapping[str, Any], model_config: ZImageBackboneConfig) -> nn.Module:
    """The transformer (with LoRA layers when configured) on the meta device, weights unset."""
    from ..qwen_image.export import plain_transformer as build
    from .lora import add_lora
    from .transformer import TwinFlowZImageTransformer

    return build(transformer_config, model_config, cls=TwinFlowZImageTransformer, inject=add_lora)


def export_keys(transformer_config: Mapping[str, Any], model_config: ZImageBackboneConfig) -> set[str]:
    """The state-dict keys an export writes."""
    return set(plain_transformer(transformer_config, model_config).state_dict())


def write_transformer(state: dict[str, torch.Tensor], transformer_config: Mapping[str, Any],
                      model_config: ZImageBackboneConfig, folder: Path, *, weights: str, merge_lora: bool) -> None:
    """Write ``state`` (the transformer's full state dict) into ``folder`` (see the module docstring)."""
    from diffusers import ZImagePipeline

    from ..qwen_image.export import save_transformer

    save_transformer(plain_transformer(transformer_config, model_config), state, model_config, folder,
                     pipeline=ZImagePipeline, weights=weights, merge_lora=merge_lora)
