"""Tiny OpenUni configurations for tests and smoke runs (built locally, nothing downloaded).

Widths differ on purpose (LLM 32, SANA caption 24, SANA inner 16) so that a projection applied in the
wrong place fails on shape instead of passing silently. Every code path of the real models is kept:
SANA's linear self-attention, cross-attention and GLUMBConv feed-forward, the connector's bidirectional
encoder layers, a causal Qwen2 LLM behind InternVL's vision tower, a DC-AE with residual blocks.
"""
from __future__ import annotations

from typing import Any

TINY_LATENT_CHANNELS = 4
"""Latent channels of the tiny DC-AE and SANA (the real DC-AE f32c32 has 32)."""
TINY_LLM_HIDDEN_SIZE = 32
"""Hidden width of the tiny InternVL language model (InternVL3-2B: 1536); also the connector's width."""
TINY_NUM_QUERIES = 8
"""Learnable queries of the tiny build (the reference: 256)."""


def tiny_transformer_config() -> dict[str, Any]:
    """Keyword arguments for a 2-layer ``SanaTransformer2DModel`` (and the TwinFlow subclass)."""
    return {
        "in_channels": TINY_LATENT_CHANNELS,
        "out_channels": TINY_LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 8,
        "cross_attention_dim": 16,
        "caption_channels": 24,
        "sample_size": 8,
        "patch_size": 1,
    }


def tiny_connector_config() -> dict[str, Any]:
    """Keyword arguments of :class:`~.query_head.ConnectorConfig` for a 2-layer connector."""
    return {
        "hidden_size": TINY_LLM_HIDDEN_SIZE,
        "intermediate_size": 2 * TINY_LLM_HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }


def tiny_vae_config() -> dict[str, Any]:
    """Keyword arguments for a 2-stage ``AutoencoderDC`` (spatial compression 2; the real one: 32)."""
    return {
        "in_channels": 3,
        "latent_channels": TINY_LATENT_CHANNELS,
        "attention_head_dim": 8,
        "encoder_block_types": "ResBlock",
        "decoder_block_types": "ResBlock",
        "encoder_block_out_channels": (8, 16),
        "decoder_block_out_channels": (8, 16),
        "encoder_layers_per_block": (1, 1),
        "decoder_layers_per_block": (1, 1),
        "encoder_qkv_multiscales": ((), ()),
        "decoder_qkv_multiscales": ((), ()),
        "scaling_factor": 0.41407,
    }
