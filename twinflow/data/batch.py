"""Batches: raw (pixels + captions) and training-ready (latents + conditions).

Both the raw-data path (encode on the fly) and the cache path produce a :class:`TrainBatch`, so the
trainer has one input type and the two paths can be compared batch for batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class RawBatch:
    """Decoded images (B, 3, H, W) in [-1, 1], their captions, optional reference images, and which
    dataset items they are (``indices`` into the dataset, ``keys`` naming the source file / row)."""

    pixels: Tensor
    captions: list[str]
    ref_pixels: Tensor | None
    indices: list[int]
    keys: list[str]

    def __len__(self) -> int:
        return self.pixels.shape[0]


@dataclass
class TrainBatch:
    """What a training step consumes: latents (B, C, h, w), the condition and the unconditional
    condition (same rows; of the backbone's condition type, see ``twinflow.backbones.registry``; for
    edit both carry the reference latents)."""

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


def encode_raw_batch(conditioner: Any, batch: RawBatch) -> TrainBatch:
    """Encode a raw batch with a backbone's conditioner, its text encoder and latent encoder (what the
    cache stores, computed live)."""
    latents = conditioner.pixels_to_latents(batch.pixels)
    cond, uncond = conditioner.encode_pair(batch.captions, batch.ref_pixels)
    return TrainBatch(latents, cond, uncond, list(batch.indices), list(batch.keys))
