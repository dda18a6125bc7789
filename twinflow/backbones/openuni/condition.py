"""The OpenUni condition: the query states that feed SANA's cross-attention, and an optional mask.

OpenUni conditions every image on the same number of tokens (the learnable queries, 256 in the
reference), so a batch needs no padding and the reference passes an all-true mask, which changes
nothing. ``mask`` is therefore optional; it exists for conditions of unequal lengths, which
:meth:`OpenUniCondition.cat` right-pads with ``mask == False`` (the objective joins the conditional and
unconditional halves with ``cat`` and picks rows with ``index``, see ``twinflow.method.conditioning``).

``embeds`` is either the projected states (width: SANA's ``caption_channels``) or, when the backbone
owns the connector and projector, the language model's query states (width: the LLM's hidden size);
:class:`~.backbone.OpenUniBackbone` checks which one it expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class OpenUniCondition:
    """Query states ``embeds`` (B, L, D) and an optional ``mask`` (B, L) bool (None: every token valid)."""

    embeds: Tensor
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"OpenUniCondition.embeds must be (B, L, D), got shape {tuple(self.embeds.shape)}")
        if self.mask is not None:
            if self.mask.shape != self.embeds.shape[:2]:
                raise ValueError(
                    f"OpenUniCondition.mask must be (B, L) = {tuple(self.embeds.shape[:2])}, "
                    f"got shape {tuple(self.mask.shape)}"
                )
            self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: Tensor | slice) -> "OpenUniCondition":
        """Rows ``idx`` of the batch (bool mask, index tensor or slice)."""
        return OpenUniCondition(self.embeds[idx], None if self.mask is None else self.mask[idx])

    def full_mask(self) -> Tensor:
        """The mask, with all-true standing in for ``None``."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device)

    @classmethod
    def cat(cls, conds: Sequence["OpenUniCondition"]) -> "OpenUniCondition":
        """Join along the batch. Equal lengths without masks stay maskless; otherwise every part is
        right-padded to the longest with ``mask == False``."""
        if not conds:
            raise ValueError("OpenUniCondition.cat needs at least one condition")
        lengths = {c.embeds.shape[1] for c in conds}
        if len(lengths) == 1 and all(c.mask is None for c in conds):
            return cls(torch.cat([c.embeds for c in conds], dim=0))
        longest = max(lengths)
        grow = [longest - c.embeds.shape[1] for c in conds]
        embeds = [torch.nn.functional.pad(c.embeds, (0, 0, 0, n)) for c, n in zip(conds, grow)]
        masks = [torch.nn.functional.pad(c.full_mask(), (0, n), value=False) for c, n in zip(conds, grow)]
        return cls(torch.cat(embeds, dim=0), torch.cat(masks, dim=0))

    def to(self, *args, **kwargs) -> "OpenUniCondition":
        """Like ``Tensor.to``; a dtype applies to ``embeds`` only (the mask stays bool)."""
        embeds = self.embeds.to(*args, **kwargs)
        return OpenUniCondition(embeds, None if self.mask is None else self.mask.to(device=embeds.device))
