"""Tiny, locally built SD3.5 conditioning models: CLIP-L, CLIP-G and T5 with their tokenizers, and the VAE.

Tests and the demo need a model folder in the hub layout of ``stabilityai/stable-diffusion-3.5-medium``
that loads through the real ``from_pretrained`` code paths without downloading anything:

* two CLIP tokenizers: a byte-level BPE with CLIP's ``</w>`` word-end suffix, trained on a small built-in
  corpus through :class:`transformers.CLIPTokenizer`'s own normaliser and pre-tokeniser, laid out like
  CLIP's vocabulary (the 256 byte symbols, the same with ``</w>``, the merges, then
  ``<|startoftext|>`` and ``<|endoftext|>`` last). The second pads with ``"!"``, as SD3's ``tokenizer_2``
  does; both stop at 77 tokens;
* a T5 tokenizer: a Unigram model trained on the same corpus, every ASCII symbol in its alphabet;
* :class:`CLIPTextModelWithProjection` x 2 and :class:`T5EncoderModel`, 2 layers each, with the widths
  of :mod:`.tiny`;
* a 16-channel ``AutoencoderKL`` with SD3.5's shift and scaling factors.

Builders are deterministic: weights come from a private seeded RNG (the global RNG is left as it was)
and tokenizer training on a fixed corpus is deterministic.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ..text_to_image import build_tiny_autoencoder_kl, save_folder
from .tiny import TINY_CLIP_G_WIDTH, TINY_CLIP_L_WIDTH, TINY_LATENT_CHANNELS, TINY_T5_WIDTH

CLIP_MAX_LENGTH = 77
SD35_VAE_SCALING_FACTOR = 1.5305
SD35_VAE_SHIFT_FACTOR = 0.0609
TINY_CLIP_VOCAB_SIZE = 700
TINY_T5_VOCAB_SIZE = 300

_CORPUS = (
    "a photo of a red cat sitting on a blue mat next to a green plant in the morning light",
    "an oil painting of mountains, rivers and a small wooden house under a cloudy sky at sunset",
    "a white dog running on the beach with waves, sand, shells and two children playing",
    "Generate an image. A close-up portrait, studio lighting, high detail, 35mm film, bokeh",
    "0 1 2 3 4 5 6 7 8 9 big small round square bright dark old new many few",
)
_SYMBOLS = sorted(set(string.ascii_letters + string.digits + string.punctuation))


def build_tiny_clip_tokenizer(pad_token: str = "<|endoftext|>", vocab_size: int = TINY_CLIP_VOCAB_SIZE) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer (see the module docstring); any text tokenizes without ``unk``."""
    backend = CLIPTokenizer().backend_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    ordered = alphabet + [c + "</w>" for c in alphabet]
    ordered += sorted((t for t in model["vocab"] if t not in set(ordered)), key=model["vocab"].get)
    ordered += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(ordered)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def build_tiny_t5_tokenizer(vocab_size: int = TINY_T5_VOCAB_SIZE) -> T5Tokenizer:
    """A T5 Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) whose alphabet holds every ASCII symbol."""
    corpus = list(_CORPUS) + [" ".join(_SYMBOLS)]
    return T5Tokenizer().train_new_from_iterator(corpus, vocab_size=vocab_size, initial_alphabet=_SYMBOLS)


def tiny_clip_config(tokenizer: CLIPTokenizer, width: int) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder of hidden size and projection ``width`` for ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_config(tokenizer: T5Tokenizer) -> T5Config:
    """A 2-layer T5 encoder of width ``TINY_T5_WIDTH`` (the transformer's ``joint_attention_dim``)."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_T5_WIDTH,
        d_kv=TINY_T5_WIDTH // 2,
        d_ff=2 * TINY_T5_WIDTH,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_tiny_text_encoders(
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer], seed: int = 0
) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]:
    """CLIP-L, CLIP-G and T5 (random weights from ``seed``, ``seed + 1``, ``seed + 2``), in eval mode."""
    clip_l, clip_g, t5 = tokenizers
    return (
        _seeded(lambda: CLIPTextModelWithProjection(tiny_clip_config(clip_l, TINY_CLIP_L_WIDTH)), seed),
        _seeded(lambda: CLIPTextModelWithProjection(tiny_clip_config(clip_g, TINY_CLIP_G_WIDTH)), seed + 1),
        _seeded(lambda: T5EncoderModel(tiny_t5_config(t5)), seed + 2),
    )


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny 16-channel SD3.5-style VAE (8x compression, SD3.5's shift and scaling factors)."""
    factors = {"scaling_factor": SD35_VAE_SCALING_FACTOR, "shift_factor": SD35_VAE_SHIFT_FACTOR}
    return build_tiny_autoencoder_kl(**factors, channels=TINY_LATENT_CHANNELS, seed=seed)


def build_tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer]:
    """(``tokenizer``, ``tokenizer_2``, ``tokenizer_3``) as in SD3.5's repository."""
    return build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="!"), build_tiny_t5_tokenizer()


def save_tiny_model_folder(path: str | Path, seed: int = 0) -> Path:
    """Write ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/`` and ``vae/`` under ``path`` (the hub layout;
    no ``model_index.json``: the folder carries only the conditioning components)."""
    tokenizers = build_tiny_tokenizers()
    components = {}
    for suffix, tokenizer, encoder in zip(("", "_2", "_3"), tokenizers, build_tiny_text_encoders(tokenizers, seed=seed)):
        components.update({f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": encoder})
    return save_folder(path, {**components, "vae": build_tiny_vae(seed=seed)})
