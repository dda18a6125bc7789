"""LoRA target modules of the SANA transformer (peft ``target_modules`` names).

The reference's OpenUni LoRA recipes (``openuni_lora_{1,2}order.yaml``) list one string for every
backbone: Qwen-Image's ``add_*_proj`` / ``to_add_out`` do not exist in SANA, and peft silently skips
them. What SANA has of that list: both attentions of every block (``attn1``, linear self-attention;
``attn2``, cross-attention to the text) and the time embedding (the modulation ``time_embed.linear`` and
its two-layer timestep MLP). Targets are written in full from ``time_embed`` so that they match the
primary embedder only: the bare ``timestep_embedder.linear_1`` of the reference would also match
``time_embed_2``'s layers, which the reference never had in LoRA mode (it used the original transformer).
How ``time_embed_2`` learns under LoRA (LoRA on it, trained fully, or frozen) is configuration; its
linears are :data:`TIME_EMBED_2_LINEARS`.
"""
from __future__ import annotations

ATTENTION_TARGETS = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
TIME_EMBED_TARGETS = [
    "time_embed.linear",
    "time_embed.emb.timestep_embedder.linear_1",
    "time_embed.emb.timestep_embedder.linear_2",
]
SANA_LORA_TARGETS = ATTENTION_TARGETS + TIME_EMBED_TARGETS
"""The reference's OpenUni LoRA targets that exist in SANA."""

TIME_EMBED_2 = "time_embed_2"
TIME_EMBED_2_LINEARS = [
    f"{TIME_EMBED_2}.linear",
    f"{TIME_EMBED_2}.emb.timestep_embedder.linear_1",
    f"{TIME_EMBED_2}.emb.timestep_embedder.linear_2",
]
NAMES = {"time_embed_2": TIME_EMBED_2, "time_embed_2_linears": TIME_EMBED_2_LINEARS}


def lora_config(settings, *, dropout: float = 0.0):
    """The peft config of one adapter: Qwen-Image's rule with SANA's embedder names (imports peft)."""
    from ..qwen_image.lora import lora_config as shared

    return shared(settings, dropout=dropout, **NAMES)


def add_lora(transformer, settings) -> None:
    """Inject the trained adapter and the EMA adapter into SANA as Qwen-Image does (peft), with SANA's
    embedder names."""
    from ..qwen_image.lora import add_lora as shared

    shared(transformer, settings, **NAMES)
