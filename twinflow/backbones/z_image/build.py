"""Build the Z-Image backbone from its config (called by the trainer inside ``deepspeed.zero.Init``).

As for Qwen-Image, everything is imported when this module is imported, not inside the call (importing
diffusers for the first time inside ``zero.Init`` fails). Under ZeRO-3 a pretrained folder is built from
its ``config.json`` and its safetensors are streamed into the partitions by Qwen-Image's loader, told
Z-Image's embedder names (a plain Z-Image checkpoint gets ``t_embedder_2 <- t_embedder``; a TwinFlow one
loads its ``t_embedder_2.*`` as they are).
"""
from __future__ import annotations

import torch

from twinflow.backbones.diffusers_family import place_and_adapt
from twinflow.utils.partitioned import zero_init_active
from twinflow.utils.typed_config import ConfigError

from ..qwen_image.config import resolve_pretrained_dir
from ..qwen_image.pretrained_loading import load_checkpoint_into
from .backbone import ZImageBackbone
from .config import ZImageBackboneConfig
from .lora import add_lora
from .transformer import TWIN_PREFIX, TwinFlowZImageTransformer

PRIMARY_PREFIX = "t_embedder."


def build_z_image_backbone(config: ZImageBackboneConfig, device: torch.device | str) -> ZImageBackbone:
    """The :class:`~.backbone.ZImageBackbone` described by ``config``, on ``device`` (offline)."""
    dtype = config.torch_dtype
    if config.pretrained is not None:
        folder = resolve_pretrained_dir(config.pretrained)
        if zero_init_active():
            saved = TwinFlowZImageTransformer.load_config(str(folder), local_files_only=True)
            transformer = TwinFlowZImageTransformer.from_config(saved)
            load_checkpoint_into(transformer, folder, True, prefixes=(PRIMARY_PREFIX, TWIN_PREFIX))
        else:
            transformer = TwinFlowZImageTransformer.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        try:
            transformer = TwinFlowZImageTransformer(**config.transformer)
        except TypeError as e:
            raise ConfigError(f"config key 'model.transformer': {e}") from e
    transformer.use_kernels(config.kernels)  # before LoRA, whose injection rebinds the fused module
    place_and_adapt(transformer, config, device, add_lora)
    (backbone := ZImageBackbone(transformer, dtype=dtype)).set_gradient_checkpointing(config.gradient_checkpointing)
    return backbone
