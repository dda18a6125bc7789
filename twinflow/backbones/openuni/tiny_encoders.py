"""Tiny, locally built OpenUni components: InternVL3 (with tokenizer), query head, DC-AE, SANA.

Tests need a model folder that loads through the real ``from_pretrained`` paths without downloading:

* the tokenizer is Qwen-Image's tiny byte-level BPE (``qwen_image.tiny_encoders.build_tiny_tokenizer``:
  Qwen2's pre-tokenizer and chat special tokens, as InternVL3's Qwen2.5 tokenizer has) with InternVL's
  image tokens appended after them, in the real vocabulary's order;
* an :class:`InternVLForConditionalGeneration` with a 1-layer vision tower and a 2-layer Qwen2 LLM of
  width ``TINY_LLM_HIDDEN_SIZE``;
* an :class:`~.query_head.OpenUniQueryHead` (``TINY_NUM_QUERIES`` queries, 2-layer connector), an
  ``AutoencoderDC`` and a :class:`~.transformer.TwinFlowSanaTransformer`, sized by ``tiny.py``.

Weights come from a private seeded RNG (the global RNG is left as it was).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from twinflow.backbones.qwen_image.tiny_encoders import build_tiny_tokenizer as build_tiny_qwen_tokenizer

from .encoders import FOLDERS
from .query_head import ConnectorConfig, OpenUniQueryHead, QueryHeadConfig
from .tiny import (
    TINY_LLM_HIDDEN_SIZE,
    TINY_NUM_QUERIES,
    tiny_connector_config,
    tiny_transformer_config,
    tiny_vae_config,
)
from .transformer import TwinFlowSanaTransformer

INTERNVL_SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
"""InternVL3's tokens after Qwen2.5's (``<IMG_CONTEXT>`` is the image token)."""


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.add_tokens(list(INTERNVL_SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_internvl_config(tokenizer: PreTrainedTokenizerBase) -> InternVLConfig:
    token_id = tokenizer.convert_tokens_to_ids
    return InternVLConfig(
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": 28,
            "patch_size": 14,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_LLM_HIDDEN_SIZE,
            "intermediate_size": 2 * TINY_LLM_HIDDEN_SIZE,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        image_token_id=token_id("<IMG_CONTEXT>"),
        image_seq_length=1,
    )


def build_tiny_internvl(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> InternVLForConditionalGeneration:
    return _seeded(seed, lambda: InternVLForConditionalGeneration(tiny_internvl_config(tokenizer)).eval())


def tiny_query_head_config() -> QueryHeadConfig:
    return QueryHeadConfig(
        num_queries=TINY_NUM_QUERIES,
        llm_hidden_size=TINY_LLM_HIDDEN_SIZE,
        caption_channels=tiny_transformer_config()["caption_channels"],
        connector=ConnectorConfig(**tiny_connector_config()),
    )


def build_tiny_query_head(seed: int = 0) -> OpenUniQueryHead:
    return _seeded(seed, lambda: OpenUniQueryHead(tiny_query_head_config()))


def build_tiny_vae(seed: int = 0) -> AutoencoderDC:
    return _seeded(seed, lambda: AutoencoderDC(**tiny_vae_config()).eval())


def build_tiny_transformer(seed: int = 0, **kwargs) -> TwinFlowSanaTransformer:
    return _seeded(seed, lambda: TwinFlowSanaTransformer(**tiny_transformer_config(), **kwargs))


def save_tiny_model_folder(path: str | Path, seed: int = 0) -> Path:
    """Write an OpenUni folder: ``internvl/`` (model and tokenizer), ``vae/``, ``transformer/``, ``query_head/``."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / FOLDERS["internvl"])
    build_tiny_internvl(tokenizer, seed).save_pretrained(root / FOLDERS["internvl"])
    build_tiny_vae(seed).save_pretrained(root / FOLDERS["vae"])
    build_tiny_transformer(seed).save_pretrained(root / FOLDERS["transformer"])
    build_tiny_query_head(seed).save_pretrained(root / FOLDERS["query_head"])
    return root
