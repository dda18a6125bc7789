"""Z-Image's memory inventory for the memory plan (``twinflow.training.memory_plan``).

Parameter counts are exact: the TwinFlow transformer (``t_embedder_2`` included) is built from its
config on the ``meta`` device, by default the published Z-Image-Turbo config (diffusers'
``ZImageTransformer2DModel`` defaults: D 3840, 30 layers, 2 + 2 refiner layers, 30 heads, caption width
2560). The text encoder (Qwen3-4B) and the Flux VAE are counted the same way from their published
architecture configs.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from twinflow.backbones.diffusers_family import transformer_architecture as architecture_of
from twinflow.backbones.registry import ActivationProfile, MemoryInventory, param_sizes_by_module

from ..qwen_image.config import resolve_pretrained_dir
from .config import TRANSFORMER_DEFAULTS, ZImageBackboneConfig

MEASURED = {"saved_bytes_per_width": 89.5, "saved_bytes_constant": 528}
ESTIMATED = {"backward_transient_widths": 16, "no_grad_block_widths": 12, "non_block_widths": 94}
ACTIVATIONS = ActivationProfile(**MEASURED, **ESTIMATED, measured_on="diffusers' ZImageTransformerBlock")
"""Saved bytes per token and row ``89.5 * D + 528``: measured on CPU in bf16 with ``saved_tensors_hooks``
on one ``ZImageTransformerBlock`` (head dim 128, widths 256 and 512, 64 image + 16 caption tokens,
batches of 3 minus 2 rows, parameters excluded), as ``benchmarks/block_saved_bytes.py`` measures Qwen-Image;
the constant is mostly the per-row complex float32 RoPE table (512 B per token). The SwiGLU feed-forward
(hidden 8D/3) dominates. Estimates: the backward's peak holds the feed-forward's three 8D/3 tensors and
their gradients plus the residual-stream gradients (16 D); a forward without grad the two 8D/3 branches,
their product and the residual stream (12 D). Outside the ``layers.`` blocks: 4 D for embeddings and the
final layer, plus the refiners (2 noise-refiner blocks on the image tokens and 2 context-refiner blocks on
the caption tokens: two blocks' worth over the whole sequence, 2 x 89.5 / 2 = 90 D-wide bf16 tensors)."""

ARCHITECTURE_KEYS = tuple(TRANSFORMER_DEFAULTS)

QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
"""Qwen3-4B's architecture (Z-Image's text encoder), from its published config."""

FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""The Flux VAE's architecture (Z-Image's ``vae/config.json``)."""


def transformer_param_sizes(transformer_config: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter sizes by module of the TwinFlow Z-Image transformer, built on the ``meta`` device
    (``transformer_config`` defaults to the published Z-Image-Turbo config)."""
    from .transformer import TwinFlowZImageTransformer

    config = dict(TRANSFORMER_DEFAULTS if transformer_config is None else transformer_config)
    with torch.device("meta"):
        model = TwinFlowZImageTransformer(**config)
    return param_sizes_by_module(model)


def encoder_params() -> dict[str, int]:
    """Exact parameter counts of the text encoder (``Qwen3Model``, as the conditioner loads it) and the
    VAE, built on the ``meta`` device."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        text = Qwen3Model(Qwen3Config(**QWEN3_4B))
        vae = AutoencoderKL(**FLUX_VAE)
    return {"text_encoder": sum(p.numel() for p in text.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


def transformer_architecture(model: ZImageBackboneConfig) -> tuple[dict[str, Any], str]:
    """The transformer architecture of the run (over the defaults) and where it came from (no weights are read)."""
    return architecture_of(model, resolve_pretrained_dir, TRANSFORMER_DEFAULTS, "Z-Image-Turbo", ARCHITECTURE_KEYS,
                           defaults=TRANSFORMER_DEFAULTS)


def memory_inventory(model: ZImageBackboneConfig) -> MemoryInventory:
    """The seam's inventory: the ``layers.`` blocks (the refiners are counted outside them, see
    :data:`ACTIVATIONS`), width ``dim``, the first ``all_patch_size``."""
    arch, source = transformer_architecture(model)
    return MemoryInventory(transformer_param_sizes(arch), "layers.", int(arch["dim"]), int(arch["all_patch_size"][0]),
                           source, ACTIVATIONS)
