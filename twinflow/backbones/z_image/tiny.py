"""A tiny Z-Image transformer configuration for tests and smoke runs (built locally, nothing downloaded).

It keeps Z-Image's code paths: the noise and context refiners, the single-stream layers over the joint
image/caption sequence, 3-axis RoPE, 16 latent channels and 2x2 patches. Only the time embedder keeps
its real hidden size (diffusers fixes it at 1024). ``cap_feat_dim`` equals the hidden size of the tiny
text encoder of ``tiny_encoders.py``.
"""
from __future__ import annotations

from typing import Any

TINY_LATENT_CHANNELS = 16
TINY_CAPTION_WIDTH = 32


def tiny_transformer_config() -> dict[str, Any]:
    """Keyword arguments for a 2-layer ``ZImageTransformer2DModel`` (and the TwinFlow subclass)."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": TINY_LATENT_CHANNELS,
        "dim": 64,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": TINY_CAPTION_WIDTH,
        "axes_dims": [8, 12, 12],
        "axes_lens": [64, 32, 32],
    }
