"""Tiny Qwen-Image configurations for tests and smoke runs (built locally, nothing downloaded).

Sizes are chosen to keep every code path of the real model (joint text/image attention, 3-axis RoPE,
2x2 patching, modulation) while running in milliseconds on CPU. The tiny text encoder built by
``tiny_encoders.py`` must have a hidden size equal to ``joint_attention_dim``.
"""
from __future__ import annotations

from typing import Any

TINY_LATENT_CHANNELS = 4
"""Latent channels C of the tiny model: ``in_channels == C * patch_size**2``, ``out_channels == C``."""


def tiny_transformer_config() -> dict[str, Any]:
    """Keyword arguments for a 2-layer ``QwenImageTransformer2DModel`` (and the TwinFlow subclass)."""
    return {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "axes_dims_rope": (4, 6, 6),
    }
