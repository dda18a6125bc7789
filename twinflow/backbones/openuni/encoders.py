"""OpenUni conditioning: prompts through the frozen InternVL3 LLM with the learnable queries, and the
DC-AE latent codec.

What this reproduces from the reference (``OpenUniInternVL3SANAHF.prepare_text_conditions`` /
``encode_prompt`` / ``prepare_forward_input``):

* a prompt becomes ``<|im_start|>user\\nGenerate an image: {prompt}<|im_end|>\\n<|im_start|>assistant\\n<img>``;
  the unconditional prompt is the same template around ``Generate an image.`` (a custom negative
  prompt ``p`` is wrapped as ``Generate an image: p``, as the reference wraps a given ``cfg_prompt``);
* prompts are tokenized right-padded, embedded by the LLM's input embedding, and the queries are
  appended after the padding; the attention mask marks the prompt's valid tokens and all queries, and
  position ids count valid tokens only, so a query sees the same context at the same positions
  whatever the padding;
* the LLM (InternVL's language model alone: no vision input, no vocabulary logits) runs once and the
  last ``num_queries`` rows of its final hidden state are the query states;
* the query head (connector + projector) maps them to SANA's caption width;
* latents are the DC-AE's ``encode(x).latent * scaling_factor`` and pixels ``decode(z / scaling_factor)``.

Gradients: the LLM is frozen (``requires_grad`` off, eval mode), but nothing here runs under
``no_grad``: when the query head's parameters require grad, the condition carries the graph back
through the frozen LLM into the queries, the connector and the projector. That is why these states
cannot be cached when the queries train: every step re-runs the 2B LLM over prompt + queries. Run under
``torch.no_grad()`` to encode for a cache (the reference's TwinFlow recipes freeze the whole head and
encode under ``no_grad``).

The InternVL3 folder is the Hugging Face conversion (``InternVL3-2B-hf``: ``InternVLForConditionalGeneration``
and its tokenizer), not the ``trust_remote_code`` ``InternVLChatModel`` the reference loads; the
language model and tokenizer are the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderDC
from torch import Tensor
from transformers import AutoTokenizer, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from .condition import OpenUniCondition
from .query_head import OpenUniQueryHead

INSTRUCTION = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GENERATION = "Generate an image: {}"
UNCONDITIONAL_PROMPT = "Generate an image."
IMG_START_TOKEN = "<img>"

FOLDERS = {"internvl": "internvl", "vae": "vae", "transformer": "transformer", "query_head": "query_head"}
"""Sub-folders of an OpenUni model folder (``save_tiny_model_folder`` and the checkpoint conversion
write this layout)."""


def format_prompt(prompt: str) -> str:
    return INSTRUCTION.format(GENERATION.format(prompt)) + IMG_START_TOKEN


def format_negative_prompt(negative_prompt: str | None) -> str:
    text = UNCONDITIONAL_PROMPT if negative_prompt is None else GENERATION.format(negative_prompt.strip())
    return INSTRUCTION.format(text) + IMG_START_TOKEN


class OpenUniConditioner:
    """Prompts -> :class:`OpenUniCondition`; pixels <-> DC-AE latents.

    ``project=True`` (the default) returns projected states (B, Q, caption_channels) for a backbone
    without a head; ``project=False`` returns the LLM's query states (B, Q, D_llm) for a backbone that
    owns the connector and projector (:class:`~.backbone.OpenUniBackbone` with ``query_head``).
    """

    def __init__(
        self,
        internvl: InternVLForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderDC,
        query_head: OpenUniQueryHead,
        *,
        project: bool = True,
        negative_prompt: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        llm_width = int(internvl.config.text_config.hidden_size)
        if query_head.config.llm_hidden_size != llm_width:
            raise ValueError(
                f"query head expects LLM width {query_head.config.llm_hidden_size}, the InternVL LLM has {llm_width}"
            )
        self.device = torch.device(device)
        # Only the language model is used; the vision tower and the vocabulary head stay where they are.
        self.llm = internvl.model.language_model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.query_head = query_head
        self.project = project
        self.negative_text = format_negative_prompt(negative_prompt)

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        query_head: OpenUniQueryHead | None = None,
        *,
        llm_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        **options,
    ) -> "OpenUniConditioner":
        """Load ``internvl/``, ``vae/`` and (unless ``query_head`` is given) ``query_head/`` from a local
        OpenUni folder, offline; ``options`` (``project``, ``negative_prompt``) go to the constructor."""
        root = Path(model_path)
        for name in ("internvl", "vae") + (() if query_head is not None else ("query_head",)):
            if not (root / FOLDERS[name]).is_dir():
                raise FileNotFoundError(f"OpenUni folder {root} has no {FOLDERS[name]}/ sub-folder")
        internvl = InternVLForConditionalGeneration.from_pretrained(
            root / FOLDERS["internvl"], dtype=llm_dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(root / FOLDERS["internvl"], local_files_only=True)
        vae = AutoencoderDC.from_pretrained(root / FOLDERS["vae"], torch_dtype=vae_dtype, local_files_only=True)
        if query_head is None:
            query_head = OpenUniQueryHead.from_pretrained(root / FOLDERS["query_head"]).to(device)
        return cls(internvl, tokenizer, vae, query_head, device=device, **options)

    @property
    def num_queries(self) -> int:
        return self.query_head.config.num_queries

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    # ------------------------------------------------------------------ text
    def query_states(self, texts: Sequence[str]) -> Tensor:
        """The frozen LLM's final hidden states at the queries (B, Q, D_llm), for already formatted texts."""
        if not texts:
            raise ValueError("OpenUniConditioner needs at least one prompt")
        inputs = self.tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt").to(self.device)
        token_embeds = self.llm.get_input_embeddings()(inputs["input_ids"])
        batch = token_embeds.shape[0]
        queries = self.query_head.meta_queries.to(token_embeds.dtype)[None].expand(batch, -1, -1)
        mask = torch.cat([inputs["attention_mask"].bool(), inputs["attention_mask"].new_ones(batch, self.num_queries).bool()], 1)
        positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
        hidden = self.llm(
            inputs_embeds=torch.cat([token_embeds, queries], dim=1), attention_mask=mask, position_ids=positions
        ).last_hidden_state
        return hidden[:, -self.num_queries :]

    def _condition(self, states: Tensor) -> OpenUniCondition:
        if not self.project:
            return OpenUniCondition(states)
        head_dtype = self.query_head.projector.weight.dtype
        return OpenUniCondition(self.query_head(states.to(head_dtype)))

    def encode_prompts(self, texts: Sequence[str]) -> OpenUniCondition:
        """The condition of each prompt (with the head's graph when grad is enabled)."""
        return self._condition(self.query_states([format_prompt(t) for t in texts]))

    def encode_unconditional(self, batch_size: int) -> OpenUniCondition:
        """The negative-prompt condition repeated for ``batch_size`` rows (one LLM row computed)."""
        one = self._condition(self.query_states([self.negative_text]))
        return OpenUniCondition(one.embeds.expand(batch_size, -1, -1))

    def encode_pair(self, texts: Sequence[str]) -> tuple[OpenUniCondition, OpenUniCondition]:
        """(condition, unconditional condition) from one LLM pass over the prompts and the negative prompt."""
        both = self._condition(self.query_states([format_prompt(t) for t in texts] + [self.negative_text]))
        n = len(texts)
        return both.index(slice(0, n)), OpenUniCondition(both.embeds[n:].expand(n, -1, -1))

    # ------------------------------------------------------------------ pixels <-> latents
    @torch.no_grad()
    def pixels_to_latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled DC-AE latents (B, C, H/f, W/f)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        f = self.vae_scale_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got shape {tuple(images.shape)}")
        z = self.vae.encode(images.to(self.device, self.vae.dtype)).latent
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, f h, f w), nominally in [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}")
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample
