"""Qwen-Image's memory inventory for the memory plan (``twinflow.training.memory_plan``).

Parameter counts are exact: the transformer is instantiated from its config on the ``meta`` device
(no weights, no download), ``time_text_embed_2`` included. The text encoder (Qwen2.5-VL-7B) and the VAE
are counted the same way from their published architecture configs. The activation profile was
measured on diffusers 0.42's ``QwenImageTransformerBlock`` (``benchmarks/block_saved_bytes.py``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from twinflow.backbones.diffusers_family import transformer_architecture as architecture_of
from twinflow.backbones.registry import ActivationProfile, param_sizes_by_module

from .config import TRANSFORMER_DEFAULTS, QwenImageBackboneConfig, resolve_pretrained_dir

ACTIVATIONS = ActivationProfile(
    saved_bytes_per_width=58.125,
    saved_bytes_constant=8,
    backward_transient_widths=10,
    no_grad_block_widths=12,
    non_block_widths=4,
    measured_on="diffusers' QwenImageTransformerBlock",
)
"""Saved bytes per token and row ``58.125 * D + 8``: 29 D-wide bf16 tensors plus float32 RMSNorm and
attention statistics (q, k, v, the attention output and its log-sum-exp, no score matrix, as the GPU's
memory-efficient kernels do), measured at widths 256 and 512. Estimates: the backward's peak holds the
MLP hidden gradient before and after the GELU (4 D each) and the residual-stream gradients (10 D); a
forward without grad the residual stream in and out, the modulated input, q/k/v and the attention output,
or the MLP's 4 D hidden twice (12 D); the layers outside the blocks save 4 D."""

QWEN_IMAGE_TRANSFORMER = {k: v for k, v in TRANSFORMER_DEFAULTS.items()
                          if k not in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")}
"""The published Qwen-Image transformer config (``transformer/config.json`` of Qwen/Qwen-Image), which
the transformer's defaults are."""
ARCHITECTURE_KEYS = (
    *QWEN_IMAGE_TRANSFORMER,
    "zero_cond_t",
    "use_additional_t_cond",
    "use_layer3d_rope",
)
"""Keys of a pretrained ``config.json`` that shape the parameters (the rest is metadata)."""

QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "in_chans": 3,
}
"""Qwen2.5-VL-7B-Instruct's architecture (the Qwen-Image text encoder), from its published config."""


def transformer_param_sizes(transformer_config: Mapping[str, Any] | None = None,
                            twin_embedder: bool = True) -> dict[str, tuple[int, ...]]:
    """Parameter sizes by module of the TwinFlow Qwen-Image transformer, built on the ``meta`` device.

    ``transformer_config`` defaults to the published Qwen-Image config; ``twin_embedder`` adds
    ``time_text_embed_2``.
    """
    from .transformer import TwinFlowQwenImageTransformer

    config = dict(QWEN_IMAGE_TRANSFORMER if transformer_config is None else transformer_config)
    config.pop("twin_embedder", None)
    with torch.device("meta"):
        model = TwinFlowQwenImageTransformer(**config, twin_embedder=twin_embedder)
    return param_sizes_by_module(model)


def encoder_params() -> dict[str, int]:
    """Exact parameter counts of Qwen-Image's text encoder (Qwen2.5-VL-7B, vision tower and LM head
    included: the pipeline loads the whole model) and VAE, built on the ``meta`` device."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False
    )
    with torch.device("meta"):
        text = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage()  # diffusers' defaults are the Qwen-Image VAE's config
    return {"text_encoder": sum(p.numel() for p in text.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


def transformer_architecture(model: QwenImageBackboneConfig) -> tuple[dict[str, Any], str]:
    """The transformer architecture of the run and where it came from (no weights are read); the
    inline config is taken as it is (the transformer's defaults are the published config)."""
    return architecture_of(model, resolve_pretrained_dir, QWEN_IMAGE_TRANSFORMER, "Qwen-Image", ARCHITECTURE_KEYS)
