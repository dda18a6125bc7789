"""Z-Image conditioning: the Qwen3 prompt encoder and the 16-channel (Flux) VAE, as diffusers uses them.

What this reproduces from diffusers 0.42's ``ZImagePipeline.encode_prompt``:

* each prompt is one user turn rendered by the tokenizer's chat template with the generation prompt and
  ``enable_thinking=True``, padded to ``max_sequence_length`` tokens (default 512) and truncated there;
* the text encoder (``Qwen3Model``) runs with the attention mask and its *second-to-last* hidden state
  is kept;
* each prompt's valid tokens are extracted with the mask. The pipeline returns them as a list; here
  they are right-padded into a :class:`~.condition.ZImageCondition`, which the backbone turns back into
  the list.

Unconditional condition: ``""``, the pipeline's default negative prompt, which the reference's Z-Image
code also uses. Latents: see :class:`~twinflow.backbones.text_to_image.KLLatentCodec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Model

from ..text_to_image import EncoderConfig as BaseEncoderConfig
from ..text_to_image import TextToImageConditioner, check_sequence_length
from .condition import ZImageCondition

DEFAULT_SEQUENCE_LENGTH = 512
FOLDERS = ("text_encoder", "tokenizer", "vae")


@dataclass
class EncoderConfig(BaseEncoderConfig):
    """Z-Image's ``encoder`` section: the pipeline's defaults (512 tokens, negative prompt ``""``)."""

    max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    negative_prompt: str = ""


class ZImageConditioner(TextToImageConditioner):
    """Frozen Z-Image conditioning models: prompts -> :class:`ZImageCondition`, pixels <-> latents.

    Outputs are on ``device``: caption embeddings in the text encoder's dtype, latents in the VAE's.
    """

    FOLDERS = FOLDERS
    FAMILY = "Z-Image"
    CONFIG = EncoderConfig

    def __init__(
        self,
        text_encoder: Qwen3Model,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL,
        max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
        negative_prompt: str = "",
        device: torch.device | str = "cpu",
    ) -> None:
        check_sequence_length(max_sequence_length, None)
        super().__init__(vae, negative_prompt, device)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def load_components(cls, root: Path, text_dtype: torch.dtype, vae_dtype: torch.dtype):
        return (
            Qwen3Model.from_pretrained(root / "text_encoder", dtype=text_dtype, local_files_only=True),
            AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            AutoencoderKL.from_pretrained(root / "vae", torch_dtype=vae_dtype, local_files_only=True),
        )

    def components(self) -> dict[str, object]:
        """The conditioning models under ``ZImagePipeline``'s component names."""
        return {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "vae": self.vae}

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def _render(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str]) -> ZImageCondition:
        """Each prompt's caption embeddings, right-padded to the batch's longest prompt."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode_prompts needs at least one prompt")
        inputs = self.tokenizer(
            [self._render(t) for t in texts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        lengths = mask.sum(dim=1)
        embeds = torch.nn.utils.rnn.pad_sequence(list(hidden[mask].split(lengths.tolist())), batch_first=True)
        padded = torch.arange(embeds.shape[1], device=self.device)[None, :] < lengths[:, None]
        return ZImageCondition(embeds, padded)
