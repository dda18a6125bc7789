"""Build the Qwen-Image backbone from its config.

The builder is a plain function of the config, so a trainer can call it under ``deepspeed.zero.Init``.
Everything it needs is imported when this module is imported, not inside the call: importing diffusers
for the first time inside ``zero.Init`` fails (``torch._dynamo``'s import-time checks see DeepSpeed's
patched tensor constructors), so ``from twinflow.backbones.qwen_image.build import
build_qwen_image_backbone`` must simply come before the ``with zero.Init(...)`` block, as imports do.
"""
from __future__ import annotations

import torch

from twinflow.backbones.diffusers_family import place_and_adapt
from twinflow.utils.typed_config import ConfigError

from .attention import configure_attention, resolve_attention_backend
from .backbone import QwenImageBackbone
from .config import QwenImageBackboneConfig, resolve_pretrained_dir
from .lora import add_lora
from twinflow.utils.partitioned import zero_init_active
from .pretrained_loading import load_checkpoint_into
from .transformer import TwinFlowQwenImageTransformer


def build_qwen_image_backbone(config: QwenImageBackboneConfig, device: torch.device | str) -> QwenImageBackbone:
    """The :class:`~.backbone.QwenImageBackbone` described by ``config``, on ``device``.

    Loads offline (``local_files_only``). Under ``deepspeed.zero.Init`` DeepSpeed has already placed and
    partitioned the parameters, so no ``.to()`` is applied to them here.
    """
    dtype = config.torch_dtype
    extra = {"twin_embedder": config.twin_embedder, "kernels": config.kernels}
    if config.pretrained is not None:
        folder = resolve_pretrained_dir(config.pretrained)
        if zero_init_active():
            # from_pretrained's meta-device construction cannot be partitioned: build from the config
            # under zero.Init, then stream the weights into the partitions (see pretrained_loading).
            saved = TwinFlowQwenImageTransformer.load_config(str(folder), local_files_only=True)
            transformer = TwinFlowQwenImageTransformer.from_config({**saved, **extra})
            load_checkpoint_into(transformer, folder, config.twin_embedder)
        else:
            transformer = TwinFlowQwenImageTransformer.from_pretrained(
                str(folder), torch_dtype=dtype, local_files_only=True, **extra
            )
    else:
        clashes = sorted(set(config.transformer) & set(extra))
        if clashes:
            raise ConfigError(f"config key 'transformer' must not set {clashes}: they are top-level backbone keys")
        try:
            transformer = TwinFlowQwenImageTransformer(**config.transformer, **extra)
        except TypeError as e:
            raise ConfigError(f"config key 'transformer': {e}") from e
    place_and_adapt(transformer, config, device, add_lora)
    configure_attention(transformer, resolve_attention_backend(config.attention_backend, device, dtype))
    backbone = QwenImageBackbone(transformer, dtype=dtype, edit=config.edit)
    backbone.set_gradient_checkpointing(config.gradient_checkpointing)
    return backbone
