"""LoRA target modules of the Z-Image transformer (peft suffix patterns).

The reference ships no Z-Image training configuration. This adapts every attention projection of all
single-stream blocks (the main ``layers`` and both refiners), as the reference's SD3.5 LoRA adapts the
attention, plus the gated feed-forward layers, as this project's Qwen-Image default adapts the MLPs.
The time embedders and the adaLN modulations are not adapted; how ``t_embedder_2`` learns (in full,
through its own adapter, or frozen) is the LoRA settings' choice, as ``train_time_embed_2`` is for
Qwen-Image.
"""
from __future__ import annotations

LORA_TARGET_MODULES: tuple[str, ...] = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
TIME_EMBED_2 = "t_embedder_2"
