"""SD3.5's memory inventory for the memory plan (``twinflow.training.memory_plan``).

Parameter counts are exact: the TwinFlow transformer is built from its config on the ``meta`` device
(``time_text_embed_2`` included), and so are the text encoders (CLIP-L, CLIP-G, T5-XXL) and the VAE
from their published architecture configs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from twinflow.backbones.diffusers_family import transformer_architecture as architecture_of
from twinflow.backbones.registry import param_sizes_by_module

from ..qwen_image.memory import ACTIVATIONS as QWEN_IMAGE_ACTIVATIONS
from .config import TRANSFORMER_DEFAULTS, SD35BackboneConfig, resolve_pretrained_dir

ACTIVATIONS = replace(QWEN_IMAGE_ACTIVATIONS, saved_bytes_per_width=84.125,
                      measured_on="diffusers' JointTransformerBlock with dual attention and RMS q/k norm")
"""Saved bytes per token and row ``84.125 * D + 8``, measured in bf16 on CPU as
``benchmarks/block_saved_bytes.py`` measures Qwen-Image's block (saved-tensor hooks, rows 3 minus 2),
at widths 256 and 512 with 256 image and 24 text tokens. That is a dual-attention (MMDiT-X) block,
13 of SD3.5-Medium's 24; a plain joint block saves ``58.3 * D + 8``, so the plan is an upper bound.
The transient widths are Qwen-Image's estimates (same 4 D MLP, same stream layout)."""

CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
          "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
          "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu"}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
       "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4, "use_quant_conv": False, "use_post_quant_conv": False}
"""SD3.5-Medium's conditioning models (``text_encoder{,_2,_3}`` and ``vae`` of its repository)."""


def transformer_param_sizes(transformer_config: dict[str, Any], twin_embedder: bool = True) -> dict[str, tuple[int, ...]]:
    """Parameter sizes by module of the TwinFlow SD3 transformer, built on the ``meta`` device."""
    from .transformer import TwinFlowSD3Transformer

    config = {k: v for k, v in transformer_config.items() if k in TRANSFORMER_DEFAULTS}
    with torch.device("meta"):
        model = TwinFlowSD3Transformer(**config, twin_embedder=twin_embedder)
    return param_sizes_by_module(model)


def encoder_params() -> dict[str, int]:
    """Exact parameter counts of SD3.5's three text encoders and its VAE, built on the ``meta`` device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        models = {
            "text_encoder (CLIP-L)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2 (CLIP-G)": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "text_encoder_3 (T5-XXL)": T5EncoderModel(T5Config(**T5_XXL)),
            "vae": AutoencoderKL(**VAE),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def transformer_architecture(model: SD35BackboneConfig) -> tuple[dict[str, Any], str]:
    """The transformer architecture of the run (over the defaults) and where it came from (no weights are read)."""
    return architecture_of(model, resolve_pretrained_dir, TRANSFORMER_DEFAULTS, "SD3.5-Medium", TRANSFORMER_DEFAULTS,
                           defaults=TRANSFORMER_DEFAULTS)
