"""LoRA target modules of the SD3.5 transformer (peft suffix patterns).

The reference's SD3.5 LoRA configurations (``sd35_lora_1order`` / ``sd35_lora_2order``) adapt every
attention projection of both streams of the joint attention (``attn.*``; the MMDiT-X second image
attention ``attn2`` is left alone) and the timestep MLP. With ``twin_embedder`` on, the
``timestep_embedder.*`` patterns also match ``time_text_embed_2``'s timestep MLP (not its pooled-text
projection).
"""
from __future__ import annotations

LORA_TARGET_MODULES: tuple[str, ...] = (
    "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.add_q_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
TIME_EMBED_2 = "time_text_embed_2"
