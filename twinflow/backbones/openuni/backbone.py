"""The TwinFlow backbone protocol ``F(x_t, t, tt, cond) -> velocity`` on SANA / DC-AE latents.

SANA takes latents as they are, (B, C, H, W) (patch size 1 in SANA-1.6B), and timesteps in the
scheduler's units, so ``t`` and ``tt`` (signed, in [-1, 1]) are multiplied by 1000 here, as the
reference's ``GenTransformer`` does. The condition is an :class:`~.condition.OpenUniCondition`:

* without ``query_head``: projected states (B, Q, caption_channels), the conditioner applied the head;
* with ``query_head`` (an :class:`~.query_head.OpenUniQueryHead`): the LLM's query states (B, Q, D_llm),
  and the connector and projector run here, inside ``F``, as in the reference (its ``GenTransformer``
  holds them beside SANA). Then they are part of the module the trainer optimises, averages into the
  EMA and checkpoints, and the LLM states are cacheable as long as the queries themselves are frozen.

Shapes and widths come from configs, never from parameters, so the adapter also works when ZeRO-3
has partitioned the parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from .condition import OpenUniCondition
from .query_head import OpenUniQueryHead
from .transformer import TIME_SCALE


class OpenUniBackbone(nn.Module):
    """Wraps a :class:`~.transformer.TwinFlowSanaTransformer` (and optionally the query head).

    Inputs are cast to ``dtype`` (the compute dtype); the velocity is returned in ``x_t``'s dtype.
    """

    def __init__(self, transformer: nn.Module, *, dtype: torch.dtype, query_head: OpenUniQueryHead | None = None):
        super().__init__()
        self.transformer = transformer
        self.query_head = query_head
        self.dtype = dtype
        config = transformer.config
        self.latent_channels = int(config.in_channels)
        self.patch_size = int(config.patch_size)
        caption = int(config.caption_channels)
        if int(config.out_channels or config.in_channels) != self.latent_channels:
            raise ValueError(
                f"transformer config: out_channels={config.out_channels} must equal in_channels={config.in_channels} "
                "for a velocity on the input latents"
            )
        if query_head is not None and query_head.config.caption_channels != caption:
            raise ValueError(
                f"query head projects to {query_head.config.caption_channels}, SANA's caption_channels is {caption}"
            )
        self.cond_width = caption if query_head is None else query_head.config.llm_hidden_size

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: OpenUniCondition) -> None:
        if x_t.dim() != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"x_t must be (B, {self.latent_channels}, H, W), got shape {tuple(x_t.shape)}")
        if x_t.shape[2] % self.patch_size or x_t.shape[3] % self.patch_size:
            raise ValueError(f"x_t spatial size {tuple(x_t.shape[2:])} must be divisible by {self.patch_size}")
        batch = x_t.shape[0]
        if t.shape != (batch,) or tt.shape != (batch,):
            raise ValueError(f"t and tt must have shape (B,) = ({batch},), got {tuple(t.shape)} and {tuple(tt.shape)}")
        if not isinstance(cond, OpenUniCondition) or len(cond) != batch:
            raise TypeError(f"cond must be an OpenUniCondition of {batch} rows, got {cond!r:.80}")
        if cond.embeds.shape[-1] != self.cond_width:
            where = "the LLM's query states (the backbone owns the query head)" if self.query_head else "projected states"
            raise ValueError(f"cond.embeds width {cond.embeds.shape[-1]} != {self.cond_width}: expected {where}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: OpenUniCondition) -> torch.Tensor:
        self._check_inputs(x_t, t, tt, cond)
        embeds = cond.embeds
        if self.query_head is not None:
            embeds = self.query_head(embeds.to(self.query_head.projector.weight.dtype))
        out = self.transformer(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=embeds.to(self.dtype),
            encoder_attention_mask=cond.mask,
            timestep=t * TIME_SCALE,
            target_timestep=tt * TIME_SCALE,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)
