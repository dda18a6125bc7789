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

from twinflow.method.conditioning import cat_right_padded


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
        return cls(*cat_right_padded([c.embeds for c in conds], [c.full_mask() for c in conds]))

    def to(self, *args, **kwargs) -> "OpenUniCondition":
        """Like ``Tensor.to``; a dtype applies to ``embeds`` only (the mask stays bool)."""
        embeds = self.embeds.to(*args, **kwargs)
        return OpenUniCondition(embeds, None if self.mask is None else self.mask.to(device=embeds.device))


@dataclass
class OpenUniPrompt:
    """What the trainer and the sampler pass as ``cond`` to OpenUni: the formatted prompts' token ids
    ``input_ids`` (B, L) int64, right-padded, and ``mask`` (B, L) bool (True on a prompt's tokens).

    The frozen LLM runs inside the backbone on every forward (the learnable queries pass through it, so its
    states depend on trained weights and cannot be cached); what is cached is this, the tokenized prompt.
    Padding positions hold token id 0 and are masked out; the backbone ignores their ids.
    """

    input_ids: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.mask.shape != self.input_ids.shape:
            raise ValueError(
                f"OpenUniPrompt needs input_ids (B, L) and mask (B, L); got shapes {tuple(self.input_ids.shape)} "
                f"and {tuple(self.mask.shape)}"
            )
        if self.input_ids.is_floating_point():
            raise ValueError(f"OpenUniPrompt.input_ids must be integer token ids, got {self.input_ids.dtype}")
        self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def index(self, idx: Tensor | slice) -> "OpenUniPrompt":
        """Rows ``idx`` of the batch (bool mask, index tensor or slice)."""
        return OpenUniPrompt(self.input_ids[idx], self.mask[idx])

    @classmethod
    def cat(cls, conds: Sequence["OpenUniPrompt"]) -> "OpenUniPrompt":
        """Join along the batch, right-padding to the longest with id 0 and ``mask == False``."""
        if not conds:
            raise ValueError("OpenUniPrompt.cat needs at least one condition")
        return cls(*cat_right_padded([c.input_ids for c in conds], [c.mask for c in conds]))

    def unique_rows(self) -> tuple["OpenUniPrompt", Tensor]:
        """``(distinct rows, inverse)`` with ``self == distinct.index(inverse)`` (padding ignored): the
        guidance pass joins a batch with copies of one negative prompt, which then runs the LLM once."""
        keyed = torch.where(self.mask, self.input_ids, torch.full_like(self.input_ids, -1))
        distinct, inverse = torch.unique(keyed, dim=0, return_inverse=True)
        mask = distinct >= 0
        return OpenUniPrompt(distinct.clamp_min(0), mask), inverse

    def to(self, *args, **kwargs) -> "OpenUniPrompt":
        """Moves to a device; a dtype is ignored (token ids stay integers, the mask bool)."""
        device = kwargs.get("device")
        for a in args:
            if isinstance(a, (str, torch.device)):
                device = a
        return OpenUniPrompt(self.input_ids.to(device=device), self.mask.to(device=device))
