"""Tiny, locally built Z-Image conditioning models: the Qwen3 text encoder, its tokenizer and the VAE.

Tests and the demo need a model folder in the hub layout of ``Tongyi-MAI/Z-Image-Turbo`` that loads
through the real ``from_pretrained`` code paths without downloading anything:

* the tokenizer is Qwen-Image's tiny byte-level BPE
  (:func:`twinflow.backbones.qwen_image.tiny_encoders.build_tiny_tokenizer`: Qwen2's pre-tokenizer and
  special tokens, the class Z-Image's tokenizer folder names) with a chat
  template written here that renders user/assistant turns and the generation prompt in Qwen3's format,
  including its ``enable_thinking`` switch, which ``ZImagePipeline`` sets;
* a 2-layer :class:`transformers.Qwen3Model` whose hidden size is the tiny transformer's
  ``cap_feat_dim``;
* a 16-channel ``AutoencoderKL`` with the Flux VAE's shift and scaling factors, which Z-Image uses.

Builders are deterministic: weights come from a private seeded RNG (the global RNG is left as it was).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from ..qwen_image.tiny_encoders import build_tiny_tokenizer as build_tiny_qwen_tokenizer
from ..text_to_image import build_tiny_autoencoder_kl, save_folder
from .tiny import TINY_CAPTION_WIDTH, TINY_LATENT_CHANNELS

FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's rendering of plain text turns: ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``."""


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """The tiny Qwen BPE with :data:`CHAT_TEMPLATE`."""
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder_config(tokenizer: Qwen2Tokenizer) -> Qwen3Config:
    """A 2-layer Qwen3 config sized to the tokenizer, hidden size = ``cap_feat_dim``."""
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CAPTION_WIDTH,
        intermediate_size=2 * TINY_CAPTION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=TINY_CAPTION_WIDTH // 2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=pad,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=pad,
    )


def build_tiny_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> Qwen3Model:
    """The tiny Qwen3 text encoder (random weights from ``seed``), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3Model(tiny_text_encoder_config(tokenizer)).eval()


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny 16-channel Flux-style VAE (8x compression, the Flux VAE's shift and scaling factors)."""
    factors = {"scaling_factor": FLUX_VAE_SCALING_FACTOR, "shift_factor": FLUX_VAE_SHIFT_FACTOR}
    return build_tiny_autoencoder_kl(**factors, channels=TINY_LATENT_CHANNELS, seed=seed)


def save_tiny_model_folder(path: str | Path, seed: int = 0) -> Path:
    """Write ``text_encoder/``, ``tokenizer/`` and ``vae/`` under ``path`` (the hub layout)."""
    tokenizer = build_tiny_tokenizer()
    encoder = build_tiny_text_encoder(tokenizer, seed=seed)
    return save_folder(path, {"tokenizer": tokenizer, "text_encoder": encoder, "vae": build_tiny_vae(seed=seed)})
