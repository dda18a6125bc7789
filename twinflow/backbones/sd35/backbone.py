"""The TwinFlow backbone protocol ``F(x_t, t, tt, cond) -> velocity`` on SD3.5 latents.

SD3's transformer patches the (B, C, H, W) latents itself, so they go in as they are. It takes times in
``1000 sigma`` units: the signed TwinFlow times are multiplied by :data:`~.transformer.TIME_SCALE` here,
as the reference's wrapper does. Its output is the flow-matching velocity ``noise - data`` of
``x_t = sigma noise + (1 - sigma) data``, which is TwinFlow's ``F`` (ALGORITHM.md §1): no sign change.

Shapes and channel counts come from the transformer's config, never from its parameters, so the adapter
also works when DeepSpeed ZeRO-3 has partitioned the parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..text_to_image import LatentBackbone
from .condition import SD3Condition
from .transformer import TIME_SCALE


class SD3Backbone(LatentBackbone):
    """Wraps a :class:`~.transformer.TwinFlowSD3Transformer` into the TwinFlow backbone protocol.

    ``t`` and ``tt`` are signed (B,) times. Latents and text are cast to ``dtype`` (the model's compute
    dtype); the times are scaled in float32; the velocity is returned in ``x_t``'s dtype.
    """

    condition_type = SD3Condition

    def __init__(self, transformer: nn.Module, *, dtype: torch.dtype):
        super().__init__(transformer, dtype=dtype)
        config = transformer.config
        self.patch_size = int(config.patch_size)
        self.latent_channels = int(config.in_channels)
        self.text_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        if int(config.out_channels) != self.latent_channels:
            raise ValueError(
                f"transformer config: out_channels={config.out_channels} must equal in_channels={config.in_channels} "
                "for a velocity on the input latents"
            )

    def check_condition(self, cond: SD3Condition) -> None:
        if cond.embeds.shape[-1] != self.text_dim or cond.pooled.shape[-1] != self.pooled_dim:
            raise ValueError(
                f"cond widths (embeds {cond.embeds.shape[-1]}, pooled {cond.pooled.shape[-1]}) != transformer "
                f"joint_attention_dim {self.text_dim} / pooled_projection_dim {self.pooled_dim}"
            )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: SD3Condition) -> torch.Tensor:
        self.check_inputs(x_t, t, tt, cond)
        out = self.transformer(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            pooled_projections=cond.pooled.to(self.dtype),
            timestep=t.float() * TIME_SCALE,
            target_timestep=tt.float() * TIME_SCALE,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)
