"""Batches: raw (pixels + captions) and training-ready (latents + conditions).

Both the raw-data path (encode on the fly) and the cache path produce a :class:`TrainBatch`, so the
trainer has one input type and the two paths can be compared batch for batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class RawBatch:
    """Decoded images (B, 3, H, W) in [-1, 1], their captions, optional reference images, and which
    dataset items they are (``indices`` into the dataset, ``keys`` naming the source file / row).
    ``pixels`` is None for a batch of prompts without images (``data.source: prompts``)."""

    pixels: Tensor | None
    captions: list[str]
    ref_pixels: Tensor | None
    indices: list[int]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class TrainBatch:
    """What a training step consumes: latents (B, C, h, w), the condition and the unconditional
    condition (same rows; of the backbone's condition type, see ``twinflow.backbones.registry``; for
    edit both carry the reference latents).

    A batch of prompts without images (``data.source: prompts``) has :func:`placeholder_latents`:
    zeros that the image-free objective (``method.use_image_free``) never reads; it takes only their
    shape, dtype and device for the noise it turns into the model's own one-step samples."""

    latents: Tensor
    cond: Any
    uncond: Any
    indices: list[int]
    keys: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TrainBatch":
        """Move to ``device``; ``dtype`` applies to latents, embeddings and reference latents."""
        return TrainBatch(
            self.latents.to(device=device, dtype=dtype),
            self.cond.to(device=device, dtype=dtype),
            self.uncond.to(device=device, dtype=dtype),
            self.indices,
            self.keys,
        )


def placeholder_latents(batch_size: int, latent_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The latents of a batch of prompts without images: zeros (``batch_size``, *``latent_shape``)."""
    return torch.zeros(batch_size, *latent_shape, dtype=dtype)


def prompt_latent_shape(conditioner: Any, image_size: int) -> list[int]:
    """(C, h, w) of the latents of ``image_size`` square images under a backbone's latent codec."""
    side = image_size // conditioner.vae_scale_factor
    return [int(conditioner.latent_channels), side, side]


def encode_raw_batch(conditioner: Any, batch: RawBatch, *, latent_shape: Sequence[int] | None = None) -> TrainBatch:
    """Encode a raw batch with a backbone's conditioner, its text encoder and latent encoder (what the
    cache stores, computed live). A batch without pixels (prompts only) encodes its prompts alone and
    gets :func:`placeholder_latents` of ``latent_shape`` (see :func:`prompt_latent_shape`)."""
    if batch.pixels is None:
        if latent_shape is None:
            raise ValueError("a batch of prompts without images needs latent_shape for its placeholder latents")
        latents = placeholder_latents(len(batch), latent_shape)
    else:
        latents = conditioner.pixels_to_latents(batch.pixels)
    cond, uncond = conditioner.encode_pair(batch.captions, batch.ref_pixels)
    return TrainBatch(latents, cond, uncond, list(batch.indices), list(batch.keys))
