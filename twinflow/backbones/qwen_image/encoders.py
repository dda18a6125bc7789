"""Qwen-Image conditioning: the Qwen2.5-VL prompt encoder and the Qwen-Image VAE, as diffusers uses them.

What this reproduces from diffusers 0.42 (``QwenImagePipeline`` / ``QwenImageEditPipeline`` /
``QwenImageEditPlusPipeline``):

* the prompt is wrapped in the pipeline's chat template, run through the language model of
  ``Qwen2_5_VLForConditionalGeneration`` and the *last* hidden state is kept;
* each sample's valid tokens are extracted with its attention mask (so the padding side does not
  matter), the template's leading tokens are dropped and the rest is right-padded with a bool mask.
  The pipelines hard-code the number of dropped tokens (34 for text-to-image, 64 for edit); that number
  is the token count of the template up to and including ``<|im_start|>user\\n``, so it is computed
  here from the loaded tokenizer (which gives 34 / 64 with Qwen's vocabulary) and every encoded sample
  is checked to start with exactly those tokens. The template's closing tokens
  (``<|im_end|>\\n<|im_start|>assistant\\n``) are *kept*, as in the pipelines;
* text-to-image truncates to ``max_sequence_length`` (at most 1024) tokens after the template; the edit
  pipelines do not truncate, and neither do we for them;
* latents are the VAE posterior mode on 5-D input ``(B, C, F=1, H, W)`` normalised by the VAE config's
  ``latents_mean`` / ``latents_std`` (``(z - mean) / std``), exactly as the edit pipeline encodes its
  reference image and as the pipelines invert before decoding.

Unconditional condition: the reference TwinFlow code encodes ``"Generate an image."`` (text-to-image)
and ``"Edit this image."`` with the same reference image (edit) as the negative prompt, so those are the
defaults here (the guided target of the objective depends on it); diffusers' own examples use ``" "``,
available through ``negative_prompt``.

Edit variants: ``edit`` follows ``QwenImageEditPipeline`` (vision tokens inside the template, the VL
model sees the reference image as given); ``edit_plus`` follows ``QwenImageEditPlusPipeline`` (which the
reference trainer uses: a ``"Picture 1: "`` vision prefix before the prompt and the VL image resized to
about 384x384 pixels). In both, the reference image also goes through the VAE to give ``ref_latents``.
Training images have the configured size, so the VAE sees the reference at that size, not at the
pipelines' 1024x1024-area inference resize.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import AutoencoderKLQwenImage
from PIL import Image
from torch import Tensor
from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from .condition import QwenCondition

Variant = Literal["t2i", "edit", "edit_plus"]
DTypeName = Literal["float32", "bfloat16", "float16"]

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_USER_TURN = "<|im_start|>user\n"
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n"
)
_VISION = "<|vision_start|><|image_pad|><|vision_end|>"
_ASSISTANT_TURN = "<|im_end|>\n<|im_start|>assistant\n"
MAX_SEQUENCE_LENGTH = 1024
"""The pipelines reject a longer ``max_sequence_length``."""


@dataclass(frozen=True)
class PromptTemplate:
    """One pipeline's prompt format.

    ``text`` has a ``{}`` for ``image_prefix + prompt``; ``uses_image`` says whether the VL model sees the
    reference image; ``vl_image_area`` (pixels) is the area the image is resized to for the VL model
    (None: as given).
    """

    text: str
    image_prefix: str
    uses_image: bool
    vl_image_area: int | None
    default_negative_prompt: str

    @property
    def drop_prefix(self) -> str:
        """The part of the template whose tokens are dropped from the embeddings."""
        return self.text.split(_USER_TURN, 1)[0] + _USER_TURN


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "t2i": PromptTemplate(
        text="<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n" + _USER_TURN + "{}" + _ASSISTANT_TURN,
        image_prefix="",
        uses_image=False,
        vl_image_area=None,
        default_negative_prompt="Generate an image.",
    ),
    "edit": PromptTemplate(
        text=_EDIT_SYSTEM + _USER_TURN + _VISION + "{}" + _ASSISTANT_TURN,
        image_prefix="",
        uses_image=True,
        vl_image_area=None,
        default_negative_prompt="Edit this image.",
    ),
    "edit_plus": PromptTemplate(
        text=_EDIT_SYSTEM + _USER_TURN + "{}" + _ASSISTANT_TURN,
        image_prefix="Picture 1: " + _VISION,
        uses_image=True,
        vl_image_area=384 * 384,
        default_negative_prompt="Edit this image.",
    ),
}


@dataclass
class EncoderConfig:
    """Where the conditioning models live and how prompts are encoded (config section ``encoder``)."""

    model_path: str
    variant: Variant = "t2i"
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    negative_prompt: str | None = None
    text_encoder_dtype: DTypeName = "bfloat16"
    vae_dtype: DTypeName = "bfloat16"

    def __post_init__(self) -> None:
        if not 1 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {self.max_sequence_length}"
            )

    @property
    def resolved_negative_prompt(self) -> str:
        return self.negative_prompt if self.negative_prompt is not None else PROMPT_TEMPLATES[self.variant].default_negative_prompt


class _ImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with no video processor.

    transformers 5.x type-checks every processor slot when one is built, and the check of the (unused)
    video slot fails when torchvision is not installed, although the edit pipelines never pass videos.
    Only that check is relaxed; all text and image processing is the parent's.
    """

    def check_argument_for_proper_class(self, argument_name, argument):  # type: ignore[override]
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _require_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {root} has no '{name}/' subfolder (expected the Qwen-Image hub layout: "
            "text_encoder/, tokenizer/, vae/ and, for edit, processor/)"
        )
    return folder


def _fit_area(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) with the aspect ratio of the input, about ``area`` pixels, multiples of 32."""
    ratio = width / height
    new_w = math.sqrt(area * ratio)
    return int(round(new_w / 32) * 32), int(round(new_w / ratio / 32) * 32)


def tensor_to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (exact for tensors made from 8-bit images)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


class QwenImageConditioner:
    """Frozen Qwen-Image conditioning models: prompts -> :class:`QwenCondition`, pixels <-> latents.

    Outputs are on ``device``: text embeddings in the text encoder's dtype, latents in the VAE's dtype
    (cast them to the training dtype yourself).
    """

    def __init__(
        self,
        text_encoder: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Qwen2Tokenizer,
        vae: AutoencoderKLQwenImage,
        processor: Qwen2VLProcessor | None = None,
        variant: Variant = "t2i",
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        negative_prompt: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if variant not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
        self.template = PROMPT_TEMPLATES[variant]
        if self.template.uses_image and processor is None:
            raise ValueError(f"variant {variant!r} feeds the reference image to the VL model and needs a processor")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
        self.variant = variant
        self.device = torch.device(device)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        # The edit pipelines tokenize through the processor's tokenizer, text-to-image through its own.
        self.tokenizer = processor.tokenizer if self.template.uses_image else tokenizer
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt if negative_prompt is not None else self.template.default_negative_prompt
        self.prefix_ids: list[int] = self.tokenizer(self.template.drop_prefix).input_ids
        self._uncond_t2i: QwenCondition | None = None
        z_dim = self.vae.config.z_dim
        self._latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self._latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        variant: Variant = "t2i",
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        negative_prompt: str | None = None,
        text_encoder_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> "QwenImageConditioner":
        """Load from a local Qwen-Image(-Edit) folder, offline (``local_files_only=True``)."""
        root = Path(model_path)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder not found: {root}")
        uses_image = PROMPT_TEMPLATES[variant].uses_image
        names = ["text_encoder", "tokenizer", "vae"] + (["processor"] if uses_image else [])
        folders = {name: _require_folder(root, name) for name in names}
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folders["text_encoder"], dtype=text_encoder_dtype, local_files_only=True
        )
        tokenizer = Qwen2Tokenizer.from_pretrained(folders["tokenizer"], local_files_only=True)
        vae = AutoencoderKLQwenImage.from_pretrained(folders["vae"], torch_dtype=vae_dtype, local_files_only=True)
        processor = None
        if uses_image:
            processor = _ImageTextProcessor(
                image_processor=AutoImageProcessor.from_pretrained(folders["processor"], local_files_only=True),
                tokenizer=Qwen2Tokenizer.from_pretrained(folders["processor"], local_files_only=True),
            )
        return cls(text_encoder, tokenizer, vae, processor, variant, max_sequence_length, negative_prompt, device)

    @classmethod
    def from_config(cls, config: EncoderConfig, device: torch.device | str = "cpu") -> "QwenImageConditioner":
        return cls.from_pretrained(
            config.model_path,
            variant=config.variant,
            max_sequence_length=config.max_sequence_length,
            negative_prompt=config.negative_prompt,
            text_encoder_dtype=_DTYPES[config.text_encoder_dtype],
            vae_dtype=_DTYPES[config.vae_dtype],
            device=device,
        )

    # ------------------------------------------------------------------ properties
    @property
    def drop_tokens(self) -> int:
        """Number of leading template tokens removed from every embedding (34 / 64 with Qwen's tokenizer)."""
        return len(self.prefix_ids)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.config.text_config.hidden_size)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], ref_images: Tensor | None = None) -> QwenCondition:
        """Embeddings of ``texts`` (edit variants: with ``ref_images`` (B, 3, H, W) in [-1, 1])."""
        ref_latents = self._ref_latents(texts, ref_images)
        embeds, mask = self._encode_text(list(texts), ref_images)
        return QwenCondition(embeds, mask, ref_latents)

    @torch.no_grad()
    def encode_unconditional(self, batch_size: int, ref_images: Tensor | None = None) -> QwenCondition:
        """The negative-prompt condition for ``batch_size`` rows (edit: one per reference image)."""
        if self.template.uses_image:
            return self.encode_prompts([self.negative_prompt] * batch_size, ref_images)
        if ref_images is not None:
            raise ValueError("text-to-image conditioning takes no ref_images")
        if self._uncond_t2i is None:
            self._uncond_t2i = self.encode_prompts([self.negative_prompt])
        one = self._uncond_t2i
        return QwenCondition(one.embeds.repeat(batch_size, 1, 1), one.mask.repeat(batch_size, 1))

    @torch.no_grad()
    def encode_pair(self, texts: Sequence[str], ref_images: Tensor | None = None) -> tuple[QwenCondition, QwenCondition]:
        """(condition, unconditional condition) for a batch; the reference latents are computed once."""
        cond = self.encode_prompts(texts, ref_images)
        if not self.template.uses_image:
            return cond, self.encode_unconditional(len(texts))
        embeds, mask = self._encode_text([self.negative_prompt] * len(texts), ref_images)
        return cond, QwenCondition(embeds, mask, cond.ref_latents)

    def _ref_latents(self, texts: Sequence[str], ref_images: Tensor | None) -> Tensor | None:
        if not self.template.uses_image:
            if ref_images is not None:
                raise ValueError("text-to-image conditioning takes no ref_images (use variant 'edit' or 'edit_plus')")
            return None
        if ref_images is None:
            raise ValueError(f"variant {self.variant!r} needs ref_images (B, 3, H, W) in [-1, 1]")
        if ref_images.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} prompts but {ref_images.shape[0]} reference images")
        return self.pixels_to_latents(ref_images)

    def _vl_images(self, ref_images: Tensor) -> list[Image.Image]:
        images = tensor_to_pil(ref_images)
        area = self.template.vl_image_area
        if area is None:
            return images
        return [img.resize(_fit_area(img.width, img.height, area), Image.Resampling.LANCZOS) for img in images]

    def _encode_text(self, texts: list[str], ref_images: Tensor | None) -> tuple[Tensor, Tensor]:
        if not texts:
            raise ValueError("encode_prompts needs at least one prompt")
        formatted = [self.template.text.format(self.template.image_prefix + t) for t in texts]
        if self.template.uses_image:
            assert self.processor is not None and ref_images is not None
            inputs = self.processor(text=formatted, images=self._vl_images(ref_images), padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(
                formatted,
                max_length=self.max_sequence_length + self.drop_tokens,
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
        inputs = inputs.to(self.device)
        # The language model alone gives the same hidden states as the full model without computing
        # vocabulary logits for every token (B x L x 152k floats for the real model).
        outputs = self.text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        hidden = outputs.hidden_states[-1]
        valid = inputs["attention_mask"].bool()
        drop = self.drop_tokens
        prefix = torch.tensor(self.prefix_ids, device=self.device)
        pieces = []
        for row in range(len(texts)):
            ids = inputs["input_ids"][row][valid[row]]
            if ids.shape[0] <= drop or not torch.equal(ids[:drop], prefix):
                raise ValueError(
                    f"prompt {row} does not tokenize to the template prefix followed by the prompt; "
                    f"cannot drop {drop} template tokens (prompt: {texts[row][:80]!r})"
                )
            piece = hidden[row][valid[row]][drop:]
            pieces.append(piece if self.template.uses_image else piece[: self.max_sequence_length])
        length = max(p.shape[0] for p in pieces)
        embeds = hidden.new_zeros(len(pieces), length, hidden.shape[-1])
        mask = torch.zeros(len(pieces), length, dtype=torch.bool, device=self.device)
        for row, piece in enumerate(pieces):
            embeds[row, : piece.shape[0]] = piece
            mask[row, : piece.shape[0]] = True
        return embeds, mask

    # ------------------------------------------------------------------ pixels <-> latents
    def _check_pixels(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        multiple = self.vae_scale_factor * 2
        if images.shape[-2] % multiple or images.shape[-1] % multiple:
            raise ValueError(
                f"image height and width must be multiples of {multiple} (VAE factor x 2x2 patches), "
                f"got shape {tuple(images.shape)}"
            )

    @torch.no_grad()
    def drop_text_encoder(self) -> None:
        """Free the text encoder (~16 GB of host memory for Qwen2.5-VL-7B); the VAE stays."""
        self.text_encoder = None

    def pixels_to_latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8)."""
        self._check_pixels(images)
        x = images.to(self.device, self.vae.dtype).unsqueeze(2)
        z = self.vae.encode(x).latent_dist.mode()
        mean = self._latents_mean.to(z.device, z.dtype)
        std = self._latents_std.to(z.device, z.dtype)
        return ((z - mean) / std)[:, :, 0]

    @torch.no_grad()
    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        z = latents.to(self.device, self.vae.dtype).unsqueeze(2)
        mean = self._latents_mean.to(z.device, z.dtype)
        inv_std = 1.0 / self._latents_std.to(z.device, z.dtype)
        return self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

