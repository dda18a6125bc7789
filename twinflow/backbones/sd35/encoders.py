"""SD3.5 conditioning: CLIP-L, CLIP-G and T5 prompt encoders and the 16-channel VAE, as diffusers uses them.

What this reproduces from diffusers 0.42's ``StableDiffusion3Pipeline.encode_prompt`` (one prompt for
all three encoders, no ``clip_skip``):

* each CLIP (``CLIPTextModelWithProjection``) sees the prompt padded to 77 tokens (CLIP-L's
  ``model_max_length``, used for both) and gives its *penultimate* hidden state and its projected
  pooled embedding; the two hidden states are concatenated along the width and zero-padded to T5's;
* T5 (``T5EncoderModel``) sees the prompt padded to ``max_sequence_length`` tokens (default 256, at most
  512), without an attention mask, as the pipeline calls it; its last hidden state follows the CLIP
  tokens, giving ``77 + max_sequence_length`` positions;
* the pooled condition is CLIP-L's and CLIP-G's pooled embeddings concatenated.

The condition's ``mask`` is CLIP's attention mask followed by T5's (which positions are padding); the
transformer attends to every position regardless, as in the pipeline.

Unconditional condition: the reference TwinFlow code encodes ``"Generate an image."`` as the negative
prompt for SD3.5, so that is the default here (the guided target of the objective depends on it);
diffusers' pipeline uses ``""``, available through ``negative_prompt``. Latents: see
:class:`~twinflow.backbones.text_to_image.KLLatentCodec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ..text_to_image import EncoderConfig as BaseEncoderConfig
from ..text_to_image import TextToImageConditioner, check_sequence_length
from .condition import SD3Condition

MAX_SEQUENCE_LENGTH = 512
"""The pipeline rejects a longer T5 ``max_sequence_length``."""
DEFAULT_SEQUENCE_LENGTH = 256
DEFAULT_NEGATIVE_PROMPT = "Generate an image."
FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae")


@dataclass
class EncoderConfig(BaseEncoderConfig):
    """SD3.5's ``encoder`` section: T5 length 256 by default (at most 512), negative prompt as the reference."""

    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH

    max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT


class SD3Conditioner(TextToImageConditioner):
    """Frozen SD3.5 conditioning models: prompts -> :class:`SD3Condition`, pixels <-> latents.

    Outputs are on ``device``: text embeddings in the CLIP-L encoder's dtype (as the pipeline casts
    them), latents in the VAE's dtype.
    """

    FOLDERS = FOLDERS
    FAMILY = "SD3.5"
    CONFIG = EncoderConfig

    def __init__(
        self,
        text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel],
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer],
        vae: AutoencoderKL,
        max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        device: torch.device | str = "cpu",
    ) -> None:
        check_sequence_length(max_sequence_length, MAX_SEQUENCE_LENGTH)
        super().__init__(vae, negative_prompt, device)
        self.text_encoders = tuple(e.to(self.device).eval().requires_grad_(False) for e in text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.max_sequence_length = max_sequence_length
        self.clip_length = int(self.tokenizers[0].model_max_length)

    @classmethod
    def load_components(cls, root: Path, text_dtype: torch.dtype, vae_dtype: torch.dtype):
        kw = {"dtype": text_dtype, "local_files_only": True}
        encoders = (
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", **kw),
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw),
            T5EncoderModel.from_pretrained(root / "text_encoder_3", **kw),
        )
        tokenizers = (
            CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True),
            T5Tokenizer.from_pretrained(root / "tokenizer_3", local_files_only=True),
        )
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=vae_dtype, local_files_only=True)
        return encoders, tokenizers, vae

    def components(self) -> dict[str, object]:
        """The conditioning models under ``StableDiffusion3Pipeline``'s component names."""
        names = ("", "_2", "_3")
        parts = {f"text_encoder{n}": e for n, e in zip(names, self.text_encoders)}
        parts.update({f"tokenizer{n}": t for n, t in zip(names, self.tokenizers)})
        return {**parts, "vae": self.vae}

    def drop_text_encoder(self) -> None:
        """Free the three text encoders (T5-XXL alone is ~9.5 GB in bf16); the VAE stays."""
        self.text_encoders = None

    @property
    def embed_dim(self) -> int:
        """The joint text width: T5's ``d_model`` (the transformer's ``joint_attention_dim``)."""
        return int(self.text_encoders[2].config.d_model)

    @property
    def pooled_dim(self) -> int:
        return sum(int(e.config.projection_dim) for e in self.text_encoders[:2])

    def _tokens(self, index: int, texts: list[str], length: int) -> tuple[Tensor, Tensor]:
        inputs = self.tokenizers[index](
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device).bool()

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str]) -> SD3Condition:
        """The joint embeddings (B, 77 + max_sequence_length, D_T5) and pooled embeddings of ``texts``."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode_prompts needs at least one prompt")
        hidden, pooled = [], []
        for index in (0, 1):
            ids, clip_mask = self._tokens(index, texts, self.clip_length)
            out = self.text_encoders[index](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        dtype = self.text_encoders[0].dtype
        ids, t5_mask = self._tokens(2, texts, self.max_sequence_length)
        t5 = self.text_encoders[2](ids)[0].to(dtype)
        clip = torch.cat(hidden, dim=-1).to(dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5], dim=-2)
        return SD3Condition(embeds, torch.cat(pooled, dim=-1).to(dtype), torch.cat([clip_mask, t5_mask], dim=1))
