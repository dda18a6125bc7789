"""The TwinFlow backbone protocol ``F(x_t, t, tt, cond) -> velocity`` on Qwen-Image latents.

Latents are (B, C, H, W). The transformer sees them as a sequence of 2x2 patches, packed exactly as
``QwenImagePipeline._pack_latents`` packs them (channel-major within a patch). For the edit variant the
reference-image latents are packed the same way and appended as a second image (``img_shapes`` lists
both, as ``QwenImageEditPipeline`` does) and the prediction is sliced back to the target's tokens.

Shapes and channel counts come from the transformer's config, never from its parameters, so the adapter
also works when DeepSpeed ZeRO-3 has partitioned the parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from .condition import QwenCondition


def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), the Qwen-Image pipeline's patch order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch_size) * (w // patch_size), c * patch_size**2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of spatial size (``height``, ``width``)."""
    b, n, d = tokens.shape
    c = d // patch_size**2
    x = tokens.view(b, height // patch_size, width // patch_size, c, patch_size, patch_size)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop trailing text columns that are padding in every row; drop the mask if nothing is padding.

    Both are exact: masked keys contribute nothing, and text RoPE positions depend only on a token's index,
    so removing columns after the last valid token changes no valid token. Without a mask the flash
    backends can run. At least one column is kept (an all-empty batch keeps one masked column; every
    query still has the image keys, so no attention row is fully masked). One host sync.
    """
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)
    last = torch.where(mask.any(dim=0), positions, -1).max()
    valid_prefix = (mask | (positions > last)).all()
    last, all_valid = (int(v) for v in torch.stack([last, valid_prefix.long()]).tolist())
    keep = max(last + 1, 1)
    if all_valid and last + 1 == keep:
        return embeds[:, :keep], None
    return embeds[:, :keep], mask[:, :keep]


class QwenImageBackbone(nn.Module):
    """Wraps a :class:`~.transformer.TwinFlowQwenImageTransformer` into the TwinFlow backbone protocol.

    ``t`` and ``tt`` are signed (B,) times passed through as they are. Inputs are cast to ``dtype`` (the
    model's compute dtype) and the velocity is returned in ``x_t``'s dtype.
    """

    def __init__(self, transformer: nn.Module, *, dtype: torch.dtype, edit: bool):
        super().__init__()
        self.transformer = transformer
        self.dtype = dtype
        self.edit = edit
        config = transformer.config
        self.patch_size = int(config.patch_size)
        self.latent_channels = int(config.in_channels) // self.patch_size**2
        self.text_dim = int(config.joint_attention_dim)
        out_channels = int(config.out_channels or config.in_channels)
        if out_channels * self.patch_size**2 != int(config.in_channels):
            raise ValueError(
                f"transformer config: in_channels={config.in_channels} must equal out_channels * patch_size**2 "
                f"= {out_channels} * {self.patch_size ** 2} for a velocity on the input latents"
            )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def _check_latents(self, name: str, x: torch.Tensor, batch: int | None = None) -> None:
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.latent_channels:
            raise ValueError(f"{name} has {c} channels; the transformer expects {self.latent_channels} latent channels")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{name} spatial size H={h}, W={w} must be divisible by the patch size {self.patch_size}")
        if batch is not None and b != batch:
            raise ValueError(f"{name} batch {b} != x_t batch {batch}")

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: QwenCondition) -> None:
        self._check_latents("x_t", x_t)
        batch = x_t.shape[0]
        for name, v in (("t", t), ("tt", tt)):
            if v.shape != (batch,):
                raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(v.shape)}")
        if not isinstance(cond, QwenCondition):
            raise TypeError(f"cond must be a QwenCondition, got {type(cond).__name__}")
        if len(cond) != batch:
            raise ValueError(f"cond batch {len(cond)} != x_t batch {batch}")
        if cond.embeds.shape[-1] != self.text_dim:
            raise ValueError(
                f"cond.embeds width {cond.embeds.shape[-1]} != transformer joint_attention_dim {self.text_dim}"
            )
        if self.edit and cond.ref_latents is None:
            raise ValueError("edit backbone: cond.ref_latents (the reference-image latents) is required")
        if not self.edit and cond.ref_latents is not None:
            raise ValueError("cond.ref_latents given but the backbone is not the edit variant (set edit: true)")
        if cond.ref_latents is not None:
            self._check_latents("cond.ref_latents", cond.ref_latents, batch)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: QwenCondition) -> torch.Tensor:
        self._check_inputs(x_t, t, tt, cond)
        batch, _, height, width = x_t.shape
        p = self.patch_size
        tokens = pack_latents(x_t.to(self.dtype), p)
        num_target = tokens.shape[1]
        shapes = [(1, height // p, width // p)]
        if cond.ref_latents is not None:
            ref = cond.ref_latents
            tokens = torch.cat([tokens, pack_latents(ref.to(self.dtype), p)], dim=1)
            shapes.append((1, ref.shape[2] // p, ref.shape[3] // p))
        embeds, mask = trim_text(cond.embeds, cond.mask)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds.to(self.dtype),
            encoder_hidden_states_mask=mask,
            timestep=t,
            target_timestep=tt,
            img_shapes=[shapes] * batch,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :num_target], height, width, p).to(x_t.dtype)
