"""Qwen-Image / Qwen-Image-Edit backbone.

Only the light pieces are re-exported here; the transformer, adapter, LoRA and builder modules import
diffusers/peft and are imported from their own modules (``twinflow.backbones.qwen_image.backbone`` etc.).
"""
from .condition import QwenCondition

__all__ = ["QwenCondition"]
