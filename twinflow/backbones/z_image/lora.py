"""LoRA target modules of the Z-Image transformer (peft suffix patterns).

The reference ships no Z-Image training configuration. This adapts every attention projection of all
single-stream blocks (the main ``layers`` and both refiners), as the reference's SD3.5 LoRA adapts the
attention, plus the gated feed-forward layers, as this project's Qwen-Image default adapts the MLPs.
The time embedders and the adaLN modulations are not adapted; how ``t_embedder_2`` learns (in full,
through its own adapter, or frozen) is the LoRA settings' choice, as ``train_time_embed_2`` is for
Qwen-Image.

This module stays light (peft is imported inside the functions): the config imports its targets.
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
TIME_EMBED_2_LINEARS: tuple[str, ...] = (f"{TIME_EMBED_2}.mlp.0", f"{TIME_EMBED_2}.mlp.2")
"""``t_embedder_2``'s two linears (LoRA on them: ``lora.train_time_embed_2: lora``, the default)."""
NAMES = {"time_embed_2": TIME_EMBED_2, "time_embed_2_linears": TIME_EMBED_2_LINEARS}


def lora_config(settings, *, dropout: float = 0.0):
    """The peft config of one adapter: Qwen-Image's rule with Z-Image's embedder names (imports peft)."""
    from ..qwen_image.lora import lora_config as shared

    return shared(settings, dropout=dropout, **NAMES)


def add_lora(transformer, settings) -> None:
    """Inject the trained adapter and the EMA adapter as Qwen-Image does (peft; the EMA teacher's
    helpers are backbone-independent), with Z-Image's embedder names."""
    from ..qwen_image.lora import add_lora as shared

    shared(transformer, settings, **NAMES)
