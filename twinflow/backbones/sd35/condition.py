"""The SD3.5 condition: the joint CLIP/T5 prompt embeddings and the pooled CLIP embedding.

``StableDiffusion3Pipeline`` pads every prompt to a fixed length (77 CLIP tokens, then
``max_sequence_length`` T5 tokens) and SD3's transformer attends to every position, padding included:
it takes no text mask. So conditions of one encoder setting always have the same length, and
:meth:`SD3Condition.cat` refuses different lengths instead of padding (zero rows that the model would
attend to would change the result). The optional ``mask`` (the tokenizers' attention masks) is carried
for callers that want to know which positions are padding; the backbone does not use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class SD3Condition:
    """``embeds`` (B, L, D_joint), ``pooled`` (B, D_pooled) and an optional bool ``mask`` (B, L)."""

    embeds: Tensor
    pooled: Tensor
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        batch_and_length = tuple(self.embeds.shape[:2])
        mask_ok = self.mask is None or tuple(self.mask.shape) == batch_and_length
        if self.embeds.dim() != 3 or self.pooled.dim() != 2 or self.pooled.shape[0] != batch_and_length[0] or not mask_ok:
            raise ValueError(
                "SD3Condition needs embeds (B, L, D), pooled (B, P) and mask None or (B, L); got shapes "
                f"{tuple(self.embeds.shape)}, {tuple(self.pooled.shape)}, "
                f"{None if self.mask is None else tuple(self.mask.shape)}"
            )
        if self.mask is not None:
            self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | slice) -> "SD3Condition":
        """Rows ``idx`` of the batch (bool mask, index tensor or slice)."""
        return SD3Condition(self.embeds[idx], self.pooled[idx], None if self.mask is None else self.mask[idx])

    @classmethod
    def cat(cls, conds: Sequence["SD3Condition"]) -> "SD3Condition":
        """Concatenate along the batch; every condition must have the same text length."""
        if not conds:
            raise ValueError("SD3Condition.cat needs at least one condition")
        lengths = sorted({c.embeds.shape[1] for c in conds})
        if len(lengths) > 1:
            raise ValueError(
                f"SD3Condition.cat: text lengths {lengths} differ; SD3 attends to padding, so conditions must be "
                "encoded with the same max_sequence_length"
            )
        masks = [c.mask for c in conds]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("SD3Condition.cat: cannot mix conditions with and without a mask")
        mask = None if masks[0] is None else torch.cat(masks, dim=0)
        return cls(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]), mask)

    def to(self, *args, **kwargs) -> "SD3Condition":
        """Like ``Tensor.to``; a dtype applies to the floating tensors only (the mask stays bool)."""
        embeds = self.embeds.to(*args, **kwargs)
        mask = None if self.mask is None else self.mask.to(device=embeds.device)
        return SD3Condition(embeds, self.pooled.to(*args, **kwargs), mask)
