"""What one Qwen-Image transformer block saves for backward, per token and row: the measurement behind
the memory plan's activation profile of Qwen-Image (``twinflow.backbones.qwen_image.memory.ACTIVATIONS``).

Measurement, not training, so it lives here; ``tests/training/test_memory_plan.py`` re-checks the
profile's constants with it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def saved_storage_bytes(params: set[int], run: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes, parameters (storage
    pointers in ``params``) excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def measure_block_saved_bytes_per_token(num_heads: int, image_side: int, text_tokens: int, head_dim: int = 128) -> float:
    """Bytes one Qwen-Image block saves for backward per row and token, measured on CPU in bf16.

    Counts the storages handed to autograd (``saved_tensors_hooks``) except parameters, for a block of
    width ``num_heads * head_dim`` on ``image_side**2`` image and ``text_tokens`` text tokens. Tensors
    shared by all rows (rotary frequencies) are excluded by differencing batches of 3 and 2 rows (a
    single row saves less: some flattening copies become views). This is the
    measurement behind Qwen-Image's ``ActivationProfile`` (``twinflow/backbones/qwen_image/memory.py``); run
    it at the real width on a GPU machine to re-check.
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(
            num_layers=1, attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=64,
            in_channels=16, out_channels=4, axes_dims_rope=(16, (head_dim - 16) // 2, (head_dim - 16) // 2),
        ).to(torch.bfloat16)
    block = model.transformer_blocks[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    width = num_heads * head_dim

    def saved_bytes(rows: int) -> int:
        hidden = torch.randn(rows, image_side * image_side, width, dtype=torch.bfloat16, requires_grad=True)
        text = torch.randn(rows, text_tokens, width, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(rows, width, dtype=torch.bfloat16)
        rope = model.pos_embed([(1, image_side, image_side)] * rows, max_txt_seq_len=text_tokens, device=hidden.device)
        return saved_storage_bytes(params, lambda: block(hidden_states=hidden, encoder_hidden_states=text,
                                                         encoder_hidden_states_mask=None, temb=temb, image_rotary_emb=rope))

    return (saved_bytes(3) - saved_bytes(2)) / (image_side * image_side + text_tokens)


def measure_sana_block_saved_bytes_per_image_token(num_heads: int, image_side: int, caption_tokens: int,
                                                   head_dim: int = 32) -> float:
    """Bytes one SANA block (linear self-attention, cross-attention to the caption, GLUMBConv) saves for
    backward per row and *image* token, measured on CPU in bf16 as above (rows 3 minus 2). SANA's caption
    tokens (OpenUni's queries) are not part of the block's hidden states: their keys and values are
    counted in the block's bytes, which this divides by the image tokens only (the caption length is
    small and fixed: OpenUni's 256 queries)."""
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    width = num_heads * head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = SanaTransformerBlock(dim=width, num_attention_heads=num_heads, attention_head_dim=head_dim,
                                     num_cross_attention_heads=num_heads, cross_attention_head_dim=head_dim,
                                     cross_attention_dim=width, mlp_ratio=2.5).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def saved_bytes(rows: int) -> int:
        hidden = torch.randn(rows, image_side * image_side, width, dtype=torch.bfloat16, requires_grad=True)
        caption = torch.randn(rows, caption_tokens, width, dtype=torch.bfloat16, requires_grad=True)
        timestep = torch.randn(rows, 6 * width, dtype=torch.bfloat16)
        return saved_storage_bytes(params, lambda: block(hidden, encoder_hidden_states=caption, timestep=timestep,
                                                         height=image_side, width=image_side))

    return (saved_bytes(3) - saved_bytes(2)) / (image_side * image_side)
