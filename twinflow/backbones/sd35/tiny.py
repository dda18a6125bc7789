"""A tiny SD3.5 transformer configuration for tests and smoke runs (built locally, nothing downloaded).

It keeps SD3.5-Medium's code paths: joint text/image attention, a dual-attention (MMDiT-X) block,
RMS query/key norm, 16 latent channels and 2x2 patches. The text widths match the tiny encoders of
``tiny_encoders.py``: CLIP-L (8) and CLIP-G (16) hidden states are concatenated and zero-padded to the
T5 width (``joint_attention_dim``, 32); their projections concatenate to ``pooled_projection_dim`` (24).
"""
from __future__ import annotations

from typing import Any

TINY_LATENT_CHANNELS = 16
TINY_CLIP_L_WIDTH = 8
TINY_CLIP_G_WIDTH = 16
TINY_T5_WIDTH = 32


def tiny_transformer_config() -> dict[str, Any]:
    """Keyword arguments for a 2-layer ``SD3Transformer2DModel`` (and the TwinFlow subclass)."""
    return {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": TINY_LATENT_CHANNELS,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_T5_WIDTH,
        "caption_projection_dim": 32,
        "pooled_projection_dim": TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH,
        "out_channels": TINY_LATENT_CHANNELS,
        "pos_embed_max_size": 16,
        "dual_attention_layers": (0,),
        "qk_norm": "rms_norm",
    }
