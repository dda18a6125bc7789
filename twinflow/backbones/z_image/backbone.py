"""The TwinFlow backbone protocol ``F(x_t, t, tt, cond) -> velocity`` on Z-Image latents.

Z-Image runs its clock the other way: its time is ``1 - sigma`` (1 = clean image) and it predicts
``data - noise``, the negative of TwinFlow's velocity (``ZImagePipeline`` negates the prediction before
each scheduler step). The reference's adapter (its inference code for the published
TwinFlow-Z-Image-Turbo weights) maps each signed TwinFlow time ``x`` to ``sign(x) (1 - |x|)`` and
negates the output; this adapter does the same, the mapping in float64. One consequence is kept on
purpose: ``sign(0) = 0``, so ``tt = 0`` (the data end: the target of a one-step jump, and of every step
of the reference's sampler) maps to Z-Image time 0, not 1. Changing it would change what the published
weights are asked.

Latents (B, C, H, W) go in as the list of (C, 1, H, W) frames the transformer takes; captions as the list
of each prompt's valid tokens. Shapes come from the transformer's config, never from its parameters,
so the adapter also works when DeepSpeed ZeRO-3 has partitioned the parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..text_to_image import LatentBackbone
from .condition import ZImageCondition


def to_z_image_time(t: torch.Tensor) -> torch.Tensor:
    """Signed TwinFlow time -> the reference's signed Z-Image time ``sign(t) (1 - |t|)`` (float64)."""
    t = t.to(torch.float64)
    return torch.sign(t) * (1.0 - t.abs())


class ZImageBackbone(LatentBackbone):
    """Wraps a :class:`~.transformer.TwinFlowZImageTransformer` into the TwinFlow backbone protocol.

    ``t`` and ``tt`` are signed (B,) TwinFlow times. Latents and captions are cast to ``dtype`` (the
    model's compute dtype); the velocity is returned in ``x_t``'s dtype.
    """

    condition_type = ZImageCondition

    def __init__(self, transformer: nn.Module, *, dtype: torch.dtype):
        super().__init__(transformer, dtype=dtype)
        config = transformer.config
        self.patch_size = int(config.all_patch_size[0])
        self.frame_patch_size = int(config.all_f_patch_size[0])
        self.latent_channels = int(config.in_channels)
        self.text_dim = int(config.cap_feat_dim)

    def check_condition(self, cond: ZImageCondition) -> None:
        if cond.embeds.shape[-1] != self.text_dim:
            raise ValueError(f"cond.embeds width {cond.embeds.shape[-1]} != transformer cap_feat_dim {self.text_dim}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: ZImageCondition) -> torch.Tensor:
        self.check_inputs(x_t, t, tt, cond)
        frames = list(x_t.to(self.dtype).unsqueeze(2).unbind(0))
        out = self.transformer(
            frames,
            to_z_image_time(t),
            cond.to(self.dtype).captions(),
            patch_size=self.patch_size,
            f_patch_size=self.frame_patch_size,
            target_timestep=to_z_image_time(tt),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2).to(x_t.dtype)
