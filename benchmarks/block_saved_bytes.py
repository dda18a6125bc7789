"""What one Qwen-Image transformer block saves for backward, per token and row: the measurement behind
the memory plan's activation profile of Qwen-Image (``twinflow.backbones.qwen_image.memory.ACTIVATIONS``).

Measurement, not training, so it lives here; ``tests/training/test_memory_plan.py`` re-checks the
profile's constants with it.
"""
from __future__ import annotations

import torch


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
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None, temb=temb,
                  image_rotary_emb=rope)
        return sum(storages.values())

    return (saved_bytes(3) - saved_bytes(2)) / (image_side * image_side + text_tokens)
