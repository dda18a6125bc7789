"""The Z-Image condition: per-prompt caption embeddings of different lengths, stored padded with a mask.

``ZImagePipeline`` keeps each prompt's valid tokens only (a list of (L_i, D) tensors) and the
transformer takes such a list. A batch is stored here right-padded to its longest prompt with
``mask == False`` on the padding, so that the objective can index rows and concatenate batches
(``twinflow.method.conditioning``); the backbone adapter turns it back into the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from twinflow.method.conditioning import cat_right_padded


@dataclass
class ZImageCondition:
    """Caption embeddings ``embeds`` (B, L, D) with ``mask`` (B, L) bool (True on a prompt's tokens)."""

    embeds: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"ZImageCondition needs embeds (B, L, D) and mask (B, L); got shapes {tuple(self.embeds.shape)} "
                f"and {tuple(self.mask.shape)}"
            )
        self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | slice) -> "ZImageCondition":
        """Rows ``idx`` of the batch (bool mask, index tensor or slice)."""
        return ZImageCondition(self.embeds[idx], self.mask[idx])

    @classmethod
    def cat(cls, conds: Sequence["ZImageCondition"]) -> "ZImageCondition":
        """Concatenate along the batch, right-padding to the longest length with ``mask == False``."""
        if not conds:
            raise ValueError("ZImageCondition.cat needs at least one condition")
        return cls(*cat_right_padded([c.embeds for c in conds], [c.mask for c in conds]))

    def captions(self) -> list[Tensor]:
        """The list of each row's valid tokens (L_i, D), as the transformer takes them (two host syncs)."""
        return list(self.embeds[self.mask].split(self.mask.sum(dim=1).tolist()))

    def to(self, *args, **kwargs) -> "ZImageCondition":
        """Like ``Tensor.to``; a dtype applies to the embeddings only (the mask stays bool)."""
        embeds = self.embeds.to(*args, **kwargs)
        return ZImageCondition(embeds, self.mask.to(device=embeds.device))
