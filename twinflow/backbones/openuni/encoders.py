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

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import AutoencoderDC
from torch import Tensor
from transformers import AutoTokenizer, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from .condition import OpenUniCondition, OpenUniPrompt
from .query_head import OpenUniQueryHead, llm_query_states

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


class DCAELatents:
    """Pixels <-> scaled DC-AE latents through ``self.vae`` on ``self.device`` (both conditioners')."""

    vae: AutoencoderDC
    device: torch.device

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

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



class OpenUniConditioner(DCAELatents):
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


    # ------------------------------------------------------------------ text
    def query_states(self, texts: Sequence[str]) -> Tensor:
        """The frozen LLM's final hidden states at the queries (B, Q, D_llm), for already formatted texts."""
        if not texts:
            raise ValueError("OpenUniConditioner needs at least one prompt")
        if hasattr(self.query_head.meta_queries, "ds_id"):
            raise ValueError("OpenUniConditioner reads the queries outside the head's forward: give it a head that "
                             "ZeRO-3 has not partitioned (the trained backbone runs its own, see backbone.py)")
        inputs = self.tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt").to(self.device)
        token_embeds = self.llm.get_input_embeddings()(inputs["input_ids"])
        return llm_query_states(self.llm, token_embeds, inputs["attention_mask"], self.query_head.meta_queries)

    def _condition(self, states: Tensor) -> OpenUniCondition:
        if not self.project:
            return OpenUniCondition(states)
        return OpenUniCondition(self.query_head(states))

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


# ---------------------------------------------------------------------------------------------- training
DEFAULT_SEQUENCE_LENGTH = 512
"""Prompt tokens kept per prompt, template included (longer prompts are cut before the template's tail)."""
PROMPT_TAIL = "<|im_end|>\n<|im_start|>assistant\n" + IMG_START_TOKEN
"""What follows the prompt text in :func:`format_prompt`; it starts with a special token, so the tokens of
``head + tail`` are those of ``head`` followed by those of ``tail``."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EncoderConfig:
    """OpenUni's ``encoder`` section (what the cache precompute and the sampler load).

    ``model_path``: an OpenUni folder with ``internvl/`` (its tokenizer is used here; the language model
    belongs to the trained backbone) and ``vae/`` (the DC-AE). ``negative_prompt``: None is the reference's
    ``Generate an image.``; a string ``p`` becomes ``Generate an image: p``.
    """

    model_path: str
    max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    negative_prompt: str | None = None
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.max_sequence_length < 16:
            raise ValueError(f"max_sequence_length must be >= 16 (the template alone takes ~12 tokens), "
                             f"got {self.max_sequence_length}")


class OpenUniPromptConditioner(DCAELatents):
    """Prompts -> :class:`OpenUniPrompt` (token ids of the reference's template, no model run); pixels <->
    DC-AE latents. The seam's conditioner for OpenUni: training caches what this returns, and the backbone
    runs the frozen LLM with the queries on it (see ``backbone.py``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vae: AutoencoderDC, *,
                 max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH, negative_prompt: str | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length
        self.negative_text = format_negative_prompt(negative_prompt)
        self._tail = tokenizer(PROMPT_TAIL, add_special_tokens=False).input_ids

    @classmethod
    def from_config(cls, config: EncoderConfig, device: torch.device | str = "cpu") -> "OpenUniPromptConditioner":
        root = Path(config.model_path)
        for name in ("internvl", "vae"):
            if not (root / FOLDERS[name]).is_dir():
                raise FileNotFoundError(f"config key 'encoder.model_path': OpenUni folder {root} has no "
                                        f"{FOLDERS[name]}/ sub-folder")
        tokenizer = AutoTokenizer.from_pretrained(root / FOLDERS["internvl"], local_files_only=True)
        vae = AutoencoderDC.from_pretrained(root / FOLDERS["vae"], torch_dtype=DTYPES[config.vae_dtype],
                                            local_files_only=True)
        return cls(tokenizer, vae, max_sequence_length=config.max_sequence_length,
                   negative_prompt=config.negative_prompt, device=device)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, device: torch.device | str = "cpu", **settings) -> "OpenUniPromptConditioner":
        return cls.from_config(EncoderConfig(model_path=str(model_path), **settings), device)

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        """Token ids of an already formatted text, at most ``max_sequence_length``: a longer prompt loses
        its last prompt tokens, never the template's tail (which the queries follow)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= self.max_sequence_length:
            return ids
        tail = len(self._tail)
        return ids[: self.max_sequence_length - tail] + self._tail

    def _prompt(self, texts: Sequence[str]) -> OpenUniPrompt:
        rows = [torch.tensor(self.tokenize(t), dtype=torch.int64) for t in texts]
        return OpenUniPrompt.cat([OpenUniPrompt(r[None], torch.ones(1, len(r), dtype=torch.bool)) for r in rows])

    def encode_prompts(self, texts: Sequence[str], ref_images: Tensor | None = None) -> OpenUniPrompt:
        _no_reference(ref_images)
        if not texts:
            raise ValueError("OpenUniPromptConditioner needs at least one prompt")
        return self._prompt([format_prompt(t) for t in texts])

    def encode_unconditional(self, batch_size: int, ref_images: Tensor | None = None) -> OpenUniPrompt:
        _no_reference(ref_images)
        one = self._prompt([self.negative_text])
        return OpenUniPrompt(one.input_ids.expand(batch_size, -1), one.mask.expand(batch_size, -1))

    def encode_pair(self, texts: Sequence[str], ref_images: Tensor | None = None) -> tuple[OpenUniPrompt, OpenUniPrompt]:
        return self.encode_prompts(texts, ref_images), self.encode_unconditional(len(texts), ref_images)

    def drop_text_encoder(self) -> None:
        """Nothing to free: the tokenizer is not a model (the LLM belongs to the backbone)."""




def _no_reference(ref_images: Tensor | None) -> None:
    if ref_images is not None:
        raise ValueError("OpenUni is text-to-image: it takes no reference images")
