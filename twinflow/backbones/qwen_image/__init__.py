"""Qwen-Image / Qwen-Image-Edit backbone.

Only the light pieces are imported here: the condition and the spec that registers the family
(``model.family: qwen_image``, the default) with :mod:`twinflow.backbones.registry`. The transformer,
adapter, LoRA and builder modules import diffusers/peft and are imported from their own modules
(``twinflow.backbones.qwen_image.backbone`` etc.).
"""
from . import spec as _spec  # noqa: F401  (registers the family)
from .condition import QwenCondition

__all__ = ["QwenCondition"]
