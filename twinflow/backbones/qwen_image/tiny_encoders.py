"""Tiny, locally built Qwen-Image conditioning models (text encoder, tokenizer, processor, VAE).

Tests and the demo need a model folder that loads through the *real* ``from_pretrained`` code paths
without downloading anything. Everything here is constructed from configs and a small built-in corpus:

* a byte-level BPE tokenizer trained with the ``tokenizers`` library using Qwen2's own pre-tokenizer
  regex, wrapped in :class:`transformers.Qwen2Tokenizer` (the class ``QwenImagePipeline`` uses), with
  Qwen2.5-VL's special tokens (``<|im_start|>``, ``<|im_end|>``, the vision tokens) appended after the
  base vocabulary exactly as in the real vocabulary's layout;
* a 2-layer :class:`Qwen2_5_VLForConditionalGeneration` whose hidden size equals the tiny transformer's
  ``joint_attention_dim`` (32), with a 2-block vision tower;
* a :class:`Qwen2VLImageProcessorPil` (the edit pipeline's image processor) with a small pixel budget;
* an :class:`AutoencoderKLQwenImage` with ``z_dim == TINY_LATENT_CHANNELS`` and the real 8x spatial
  compression.

All builders are deterministic: weights come from a private seeded RNG (the global RNG is left as it
was), and BPE training on a fixed corpus is deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .tiny import TINY_LATENT_CHANNELS, tiny_transformer_config

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens, in the order they follow the base vocabulary in the real tokenizer."""

TINY_TEXT_HIDDEN_SIZE = tiny_transformer_config()["joint_attention_dim"]
TINY_BPE_VOCAB_SIZE = 512

_CORPUS = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.",
    "system user assistant Picture 1: Generate an image. Edit this image.",
    "a photo of a red cat sitting on a blue mat next to a green plant in the morning light",
    "an oil painting of mountains, rivers and a small wooden house under a cloudy sky at sunset",
    "a white dog running on the beach with waves, sand, shells and two children playing",
    "make the sky darker, add snow, remove the car, change the color of the door to yellow",
    "0 1 2 3 4 5 6 7 8 9 big small round square bright dark old new many few",
)


def build_tiny_tokenizer(vocab_size: int = TINY_BPE_VOCAB_SIZE) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenization and special tokens, as a ``Qwen2Tokenizer``.

    Every byte is in the base alphabet, so any text tokenizes; merges are learnt from a fixed corpus
    (the prompt templates and a few captions) so common prompt words become single tokens.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    base = len(vocab)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = base + offset
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )


def tiny_text_encoder_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A 2-layer Qwen2.5-VL config sized to the tokenizer, hidden size = ``joint_attention_dim``."""
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = TINY_TEXT_HIDDEN_SIZE // 2
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_TEXT_HIDDEN_SIZE,
            "intermediate_size": 2 * TINY_TEXT_HIDDEN_SIZE,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            # Multimodal RoPE splits head_dim / 2 frequencies over (time, height, width).
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, head_dim // 2 - 5]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": TINY_TEXT_HIDDEN_SIZE,
            "intermediate_size": 2 * TINY_TEXT_HIDDEN_SIZE,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_HIDDEN_SIZE,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )


def build_tiny_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """The tiny Qwen2.5-VL text encoder (random weights from ``seed``), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tokenizer)).eval()


def build_tiny_image_processor() -> Qwen2VLImageProcessorPil:
    """The edit pipeline's image processor with a tiny pixel budget (1 to 4 merged image tokens)."""
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)


def build_tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """A tiny Qwen-Image VAE: ``z_dim = TINY_LATENT_CHANNELS``, 8x spatial compression like the real one.

    ``latents_mean`` / ``latents_std`` are non-trivial seeded values so that tests of the latent
    normalisation can fail.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    mean = (torch.randn(TINY_LATENT_CHANNELS, generator=gen) * 0.5).tolist()
    std = (0.5 + torch.rand(TINY_LATENT_CHANNELS, generator=gen)).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=TINY_LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[round(v, 4) for v in mean],
            latents_std=[round(v, 4) for v in std],
        )
    return vae.eval()


def save_tiny_model_folder(path: str | Path, seed: int = 0) -> Path:
    """Write the hub layout ``text_encoder/``, ``tokenizer/``, ``processor/`` and ``vae/`` under ``path``.

    ``processor/`` holds the image processor config and a copy of the tokenizer, like the
    Qwen-Image-Edit repository. No ``model_index.json`` is written: the folder carries only the
    conditioning components (a transformer can be saved beside them).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tokenizer.save_pretrained(root / "processor")
    build_tiny_image_processor().save_pretrained(root / "processor")
    build_tiny_text_encoder(tokenizer, seed=seed).save_pretrained(root / "text_encoder")
    build_tiny_vae(seed=seed).save_pretrained(root / "vae")
    return root
