"""The Qwen-Image condition: padded text embeddings, their mask and (edit variant) reference latents.

Text prompts encode to different lengths, so a batch of conditions is stored padded to the longest
prompt with ``mask == False`` on the padding. :meth:`QwenCondition.cat` re-pads when conditions of
different lengths are joined (the objective concatenates the conditional and unconditional halves),
which is why this is an object with ``index``/``cat`` rather than a plain tuple of tensors (see
``twinflow.method.conditioning``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from twinflow.method.conditioning import cat_right_padded


@dataclass
class QwenCondition:
    """Text condition ``embeds`` (B, L, D_text) with ``mask`` (B, L) bool, plus optional ``ref_latents``
    (B, C, H, W) for the edit variant."""

    embeds: Tensor
    mask: Tensor
    ref_latents: Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"QwenCondition.embeds must be (B, L, D), got shape {tuple(self.embeds.shape)}")
        if self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"QwenCondition.mask must be (B, L) = {tuple(self.embeds.shape[:2])} to match embeds, "
                f"got shape {tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        if self.ref_latents is not None:
            if self.ref_latents.dim() != 4:
                raise ValueError(
                    f"QwenCondition.ref_latents must be (B, C, H, W), got shape {tuple(self.ref_latents.shape)}"
                )
            if self.ref_latents.shape[0] != self.embeds.shape[0]:
                raise ValueError(
                    f"QwenCondition.ref_latents batch {self.ref_latents.shape[0]} != embeds batch {self.embeds.shape[0]}"
                )

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | slice) -> "QwenCondition":
        """Rows ``idx`` of the batch (bool mask, index tensor or slice)."""
        ref = None if self.ref_latents is None else self.ref_latents[idx]
        return QwenCondition(self.embeds[idx], self.mask[idx], ref)

    @classmethod
    def cat(cls, conds: Sequence["QwenCondition"]) -> "QwenCondition":
        """Concatenate along the batch, right-padding text to the longest length with ``mask == False``."""
        if not conds:
            raise ValueError("QwenCondition.cat needs at least one condition")
        has_ref = [c.ref_latents is not None for c in conds]
        if any(has_ref) and not all(has_ref):
            raise ValueError("QwenCondition.cat: cannot mix conditions with and without ref_latents")
        embeds, mask = cat_right_padded([c.embeds for c in conds], [c.mask for c in conds])
        ref = torch.cat([c.ref_latents for c in conds], dim=0) if all(has_ref) else None
        return cls(embeds, mask, ref)

    def to(self, *args, **kwargs) -> "QwenCondition":
        """Like ``Tensor.to``; a dtype applies to the floating tensors only (the mask stays bool)."""
        embeds = self.embeds.to(*args, **kwargs)
        mask = self.mask.to(device=embeds.device)
        ref = None if self.ref_latents is None else self.ref_latents.to(*args, **kwargs)
        return QwenCondition(embeds, mask, ref)
