"""OpenUni's memory inventory for the memory plan (``twinflow.training.memory_plan``).

Trained (partitioned by ZeRO-3, with AdamW state and the EMA): SANA-1.6B with ``time_embed_2`` and the
query head (256 queries, the 6-layer connector, the projector). Frozen and resident on every rank in the
compute precision: InternVL3-2B's language model (the backbone runs it on every forward). Parameter
counts are exact: every model is built from its architecture on the ``meta`` device. The architectures
come from the run's folders when they are on this machine, else from the published configs below.
"""
from __future__ import annotations

from typing import Any

import torch

from twinflow.backbones.registry import ActivationProfile, FrozenPassActivations, MemoryInventory, param_sizes_by_module
from twinflow.utils.typed_config import ConfigError

from .config import SANA_PREFIX, OpenUniBackboneConfig

SANA_1600M_512PX: dict[str, Any] = {
    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32, "num_layers": 20,
    "num_cross_attention_heads": 20, "cross_attention_head_dim": 112, "cross_attention_dim": 2240,
    "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 16, "patch_size": 1,
}
"""SANA-1.6B at 512 px (``Sana_1600M_512px_diffusers``' transformer; diffusers' SANA defaults but the
sample size, which no parameter depends on)."""
INTERNVL3_2B_LLM: dict[str, Any] = {
    "vocab_size": 151674, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
}
"""InternVL3-2B's language model (Qwen2.5-1.5B with InternVL's added tokens), as its ``llm_config``."""

ACTIVATIONS = ActivationProfile(
    saved_bytes_per_width=91.11,
    saved_bytes_constant=0,
    backward_transient_widths=12,
    no_grad_block_widths=14,
    non_block_widths=4,
    measured_on="diffusers' SanaTransformerBlock, per image token with 256 caption tokens",
)
"""Saved bytes per *image* token and row ``91.11 * D``, measured in bf16 on CPU by
``benchmarks/block_saved_bytes.py`` (``measure_sana_block_saved_bytes_per_image_token``; rows 3 minus 2) at
widths 256 and 512 with 16x16 image tokens and 256 caption tokens (OpenUni's queries; at 512 px SANA also
sees 16x16 image tokens). The caption's share is inside that number, so the plan counts no text tokens
(``max_text_tokens`` is 0 in the plan's terms, see the spec). Estimates: the GLUMBConv feed-forward's
5 D-wide hidden and its gradient dominate the backward's peak (12 D) and a forward without grad (14 D)."""


def sana_architecture(config: OpenUniBackboneConfig) -> tuple[dict[str, Any], str]:
    try:
        raw = config.transformer_settings()
    except ConfigError:
        return dict(SANA_1600M_512PX), f"published SANA-1.6B 512 px config ({config.pretrained} is not on this machine)"
    keys = set(SANA_1600M_512PX) | {"norm_eps", "norm_elementwise_affine", "attention_bias", "qk_norm",
                                    "interpolation_scale", "dropout", "guidance_embeds"}
    return {k: v for k, v in raw.items() if k in keys}, str(config.folder("transformer") / "config.json")


def query_head_config(config: OpenUniBackboneConfig) -> Any:
    from .query_head import QueryHeadConfig

    try:
        return QueryHeadConfig(**config.query_head_settings())
    except ConfigError:
        return QueryHeadConfig()


def memory_inventory(config: OpenUniBackboneConfig) -> MemoryInventory:
    from .backbone import OpenUniGenerator
    from .query_head import OpenUniQueryHead
    from .transformer import TwinFlowSanaTransformer

    arch, source = sana_architecture(config)
    with torch.device("meta"):
        sana = TwinFlowSanaTransformer(**arch, twin_embedder=config.twin_embedder)
        generator = OpenUniGenerator(sana, OpenUniQueryHead(query_head_config(config)))
    return MemoryInventory(
        sizes_by_module=param_sizes_by_module(generator),
        block_prefix=SANA_PREFIX + "transformer_blocks.",
        width=int(arch["num_attention_heads"]) * int(arch["attention_head_dim"]),
        patch_size=int(arch.get("patch_size", 1)),
        architecture_source=source + "; query head: " + ("the folder's" if _has_head(config) else "OpenUni-L's"),
        activations=ACTIVATIONS,
        resident_frozen={"language model (InternVL3-2B, frozen)": llm_params(config)},
        frozen_pass=llm_pass(config) if config.train_query_head else None,
    )


LLM_SAVED_WIDTHS_PER_LAYER = 30.0
"""Estimate: a Qwen2 decoder layer saves its two RMSNorm inputs and outputs, q/k/v, the attention output
(about 6 D) and its gated MLP's four intermediate-wide tensors (4 x 8960 = 23.3 D at D = 1536), so ~30
D-wide bf16 tensors per token."""


def llm_pass(config: OpenUniBackboneConfig) -> FrozenPassActivations:
    """The LLM's activations for the backward into the queries: prompt tokens at the encoder's limit (an
    upper bound: prompts are usually far shorter) plus the queries."""
    from .encoders import DEFAULT_SEQUENCE_LENGTH

    llm = llm_settings(config)
    layers, width = int(llm["num_hidden_layers"]), int(llm["hidden_size"])
    queries = query_head_config(config).num_queries
    return FrozenPassActivations(
        label="language model (gradients into the queries)", layers=layers, width=width,
        tokens=DEFAULT_SEQUENCE_LENGTH + queries, saved_widths_per_layer=LLM_SAVED_WIDTHS_PER_LAYER,
        tokens_source=f"prompt at the encoder's limit {DEFAULT_SEQUENCE_LENGTH} + {queries} queries, an upper bound",
    )


def _has_head(config: OpenUniBackboneConfig) -> bool:
    try:
        config.query_head_settings()
        return True
    except ConfigError:
        return False


def llm_settings(config: OpenUniBackboneConfig | None = None) -> dict[str, Any]:
    """The frozen language model's architecture: the run's folder's ``text_config`` when it is here, else
    InternVL3-2B's."""
    import json

    settings = dict(INTERNVL3_2B_LLM)
    if config is not None:
        try:
            text = json.loads((config.llm_folder() / "config.json").read_text())["text_config"]
            settings = {k: text[k] for k in settings if k in text}
        except (ConfigError, OSError, KeyError, ValueError):
            pass
    return settings


def llm_params(config: OpenUniBackboneConfig | None = None) -> int:
    """Parameters of the frozen language model (:func:`llm_settings`), built on the ``meta`` device."""
    from transformers import Qwen2Config, Qwen2Model

    with torch.device("meta"):
        model = Qwen2Model(Qwen2Config(**llm_settings(config)))
    return sum(p.numel() for p in model.parameters())


def encoder_params() -> dict[str, int]:
    """The DC-AE (diffusers' ``AutoencoderDC`` defaults: the f32c32 architecture), on the ``meta`` device."""
    from diffusers import AutoencoderDC

    with torch.device("meta"):
        vae = AutoencoderDC()
    return {"vae (DC-AE f32c32)": sum(p.numel() for p in vae.parameters())}
