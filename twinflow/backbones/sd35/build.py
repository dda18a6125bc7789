"""Build the SD3.5 backbone from its config (a plain function of the config, callable under
``deepspeed.zero.Init``; imported before entering it, as Qwen-Image's builder explains)."""
from __future__ import annotations

import torch

from twinflow.backbones.diffusers_family import place_and_adapt
from twinflow.utils.partitioned import zero_init_active
from twinflow.utils.typed_config import ConfigError

from ..qwen_image.lora import add_lora
from ..qwen_image.pretrained_loading import load_checkpoint_into
from .backbone import SD3Backbone
from .config import SD35BackboneConfig, resolve_pretrained_dir
from .transformer import TwinFlowSD3Transformer


def build_sd35_backbone(config: SD35BackboneConfig, device: torch.device | str) -> SD3Backbone:
    """The :class:`~.backbone.SD3Backbone` described by ``config``, on ``device`` (offline loading).

    A plain SD3.5 checkpoint lacks ``time_text_embed_2``: it keeps its normal(0, 0.02) initialisation
    (the transformer's ``from_pretrained``, or, under ZeRO-3, the constructor's, which writes into the
    partitions).
    """
    dtype = config.torch_dtype
    extra = {"twin_embedder": config.twin_embedder}
    if config.pretrained is not None:
        folder = resolve_pretrained_dir(config.pretrained)
        if zero_init_active():
            saved = TwinFlowSD3Transformer.load_config(str(folder), local_files_only=True)
            transformer = TwinFlowSD3Transformer.from_config({**saved, **extra})
            load_checkpoint_into(transformer, folder, config.twin_embedder, twin_from_primary=False)
        else:
            transformer = TwinFlowSD3Transformer.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                                 **extra)
    else:
        try:
            transformer = TwinFlowSD3Transformer(**config.transformer, **extra)
        except TypeError as e:
            raise ConfigError(f"config key 'model.transformer': {e}") from e
    transformer.use_kernels(config.kernels)  # before LoRA, whose injection rebinds the fused module
    place_and_adapt(transformer, config, device, add_lora)
    backbone = SD3Backbone(transformer, dtype=dtype)
    backbone.set_gradient_checkpointing(config.gradient_checkpointing)
    return backbone
