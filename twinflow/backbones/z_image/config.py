"""Configuration of the Z-Image backbone (the ``model`` section with ``family: z_image``).

Light on purpose (no diffusers, no peft): it is imported whenever a config is loaded. The builder
(:mod:`.build`) and the LoRA injection (:mod:`.lora`) import this module, never the reverse.

Differences from Qwen-Image's section: there is no ``twin_embedder`` switch (the reference's Z-Image
always has ``t_embedder_2``), no ``edit`` model (``edit`` exists for the trainer and must stay false),
and no ``attention_backend`` (diffusers' Z-Image attention dispatches on its own). ``kernels: triton``
runs the fused dual-time embedding under its ``Z_IMAGE`` rule; it reads plain Linear weights, so LoRA on
``t_embedder_2`` (``lora.train_time_embed_2: lora``, the default) needs ``kernels: eager``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from twinflow.utils.typed_config import ConfigError

from ..qwen_image.config import ModelSource, check_model_source, transformer_settings
from ..qwen_image.config import LoraSettings as QwenLoraSettings
from .lora import LORA_TARGET_MODULES

FAMILY = "z_image"

TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "siglip_feat_dim": None,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1024, 512, 512),
}
"""The keys an inline ``transformer`` config may set, with the transformer's defaults (diffusers'
``ZImageTransformer2DModel`` defaults, which are Z-Image-Turbo's published ``transformer/config.json``).
A test keeps this equal to ``TwinFlowZImageTransformer.__init__``'s signature."""


@dataclass
class LoraSettings(QwenLoraSettings):
    """Qwen-Image's LoRA settings with Z-Image's targets (:data:`.lora.LORA_TARGET_MODULES`).

    ``train_time_embed_2`` defaults to ``lora`` (LoRA on ``t_embedder_2``'s two linears): ``full`` copies
    the embedder per adapter, which cannot be done on the ZeRO-3 partitioned parameters the trainer
    builds, and ``frozen`` would leave the second time embedding untrained.
    """

    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    train_time_embed_2: Literal["full", "lora", "frozen"] | None = "lora"


@dataclass
class ZImageBackboneConfig(ModelSource):
    """Where the transformer comes from and how it runs: exactly one of ``pretrained`` (a local diffusers
    folder, a pipeline root with ``transformer/`` or a transformer folder, plain Z-Image or TwinFlow
    layout; loaded offline) and ``transformer`` (an inline config, randomly initialised)."""

    family: str = FAMILY
    kernels: Literal["eager", "triton"] = "eager"
    gradient_checkpointing: bool = False
    edit: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_model_source(self, FAMILY)
        if self.edit:
            raise ConfigError("config key 'edit': Z-Image has no edit model; set edit: false")
        if self.transformer is not None:
            unknown = sorted(set(self.transformer) - set(TRANSFORMER_DEFAULTS))
            if unknown:
                raise ConfigError(f"unknown config keys 'transformer.{unknown[0]}' (of {unknown}); valid keys: "
                                  f"{sorted(TRANSFORMER_DEFAULTS)}")

    def transformer_settings(self) -> dict[str, Any]:
        """The inline ``transformer`` over the defaults, or the pretrained folder's ``config.json``
        (:class:`ConfigError` naming the file when it is unusable; read as Qwen-Image's: the same diffusers
        layouts)."""
        return transformer_settings(TRANSFORMER_DEFAULTS, self.transformer, self.pretrained)

