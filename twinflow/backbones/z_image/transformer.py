"""Z-Image transformer with TwinFlow's dual-time conditioning, as the reference's inference patch has it.

``t_emb = E1(|t| s) + E2((tt - t) s) |t - tt|`` with ``s = t_scale`` (1000) and the time arithmetic in
float64 (the second embedder's argument is computed as ``tt s - t s``, the patch's order of operations).
``t`` and ``tt`` are in Z-Image's own clock (1 = clean image, 0 = noise), signed; the mapping from
TwinFlow's times lives in the backbone adapter. Unlike Qwen-Image and SD3.5, ``E2`` sees the
*difference* of the times and the coefficient is ``|t - tt|``. ``E1`` is the pretrained ``t_embedder``;
``E2`` is ``t_embedder_2`` (the published TwinFlow-Z-Image-Turbo checkpoint's name), initialised as a
copy of ``E1``. The combine is float64 too (the patch adds a float64 product to ``E1``'s output); the
parent then casts the embedding to the latents' dtype as it always does.

Design, as for Qwen-Image: only the time embedding differs from diffusers, so the parent's ``forward``
runs unchanged. The parent computes ``self.t_embedder(t * self.t_scale)``; for a dual-time call ``t`` is
a :class:`DualTime`, whose product with the scale records the scale, and our subclass of diffusers'
embedder (same parameters, same keys) hands it back to the model. Nothing is stored between calls, and
with ``target_timestep=None`` the forward *is* diffusers' forward. At ``tt == t`` the result equals
diffusers' ``E1(t s)`` for ``t >= 0`` given as float32 (``|t| s`` is exact in float64 and rounds to
float32 exactly as diffusers' float32 product does; ``E2 * 0`` adds nothing): the tests pin it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_z_image import TimestepEmbedder, ZImageTransformer2DModel

from twinflow.kernels.dual_time_rule import Z_IMAGE, CombineRule

from ..dual_time import (FusedTimeEmbedding, check_target_timestep, copy_module_, load_with_twin_embedder,
                         parent_arguments)

TWIN_PREFIX = "t_embedder_2."


@dataclass(frozen=True)
class DualTime:
    """Stands in for ``t`` in the parent's forward: ``DualTime * scale`` records the scale."""

    timestep: torch.Tensor
    target_timestep: torch.Tensor
    compute: Callable[[TimestepEmbedder, "DualTime"], torch.Tensor]
    scale: float | None = None

    def __mul__(self, scale: float) -> "DualTime":
        return dataclasses.replace(self, scale=float(scale))


class DualTimeAwareTimestepEmbedder(TimestepEmbedder):
    """diffusers' Z-Image timestep embedder (identical parameters) that defers dual-time calls."""

    def forward(self, t) -> torch.Tensor:
        if isinstance(t, DualTime):
            return t.compute(self, t)
        return super().forward(t)


class TwinFlowZImageTransformer(FusedTimeEmbedding, ZImageTransformer2DModel):
    """``ZImageTransformer2DModel`` plus ``t_embedder_2`` and a ``target_timestep`` input.

    The configuration is the parent's: a checkpoint saved by the reference's wrapper or by this class
    loads into either, and ``t_embedder_2.*`` sit beside the base model's keys (see
    :meth:`from_pretrained`). ``kernels`` (``"eager"`` | ``"triton"``, not saved: see
    :class:`~..dual_time.FusedTimeEmbedding`): the fused kernel under ``Z_IMAGE`` with ``s = t_scale``.
    """

    embedder_names = ("t_embedder", "t_embedder_2")

    @register_to_config
    def __init__(
        self,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],  # noqa: B006 (diffusers' defaults, stored in config.json)
        axes_lens=[1024, 512, 512],  # noqa: B006
        kernels="eager",
    ) -> None:
        super().__init__(**parent_arguments(ZImageTransformer2DModel, locals()))
        first, last = self.t_embedder.mlp[0], self.t_embedder.mlp[2]
        sizes = {"out_size": last.out_features, "mid_size": first.out_features}
        sizes["frequency_embedding_size"] = first.in_features
        self.t_embedder = DualTimeAwareTimestepEmbedder(**sizes)
        self.t_embedder_2 = TimestepEmbedder(**sizes)
        copy_module_(self.t_embedder, self.t_embedder_2)
        self.use_kernels(kernels)

    def fused_rule(self) -> CombineRule:
        return dataclasses.replace(Z_IMAGE, time_scale=float(self.t_scale))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; a plain Z-Image checkpoint (no ``t_embedder_2``) gets
        ``t_embedder_2 <- t_embedder``. A TwinFlow checkpoint's ``t_embedder_2.*`` load as they are."""
        fill = lambda model: copy_module_(model.t_embedder, model.t_embedder_2)  # noqa: E731
        load = super().from_pretrained
        return load_with_twin_embedder(load, pretrained_model_name_or_path, kwargs, prefix=TWIN_PREFIX, fill=fill)

    def forward(self, x, t, cap_feats, *args, target_timestep: torch.Tensor | None = None, **kwargs):
        """diffusers' forward (same arguments) with an optional ``target_timestep`` (B,) beside ``t`` (B,),
        both in Z-Image's clock. ``target_timestep=None`` is exactly the parent model. The omni mode
        (nested lists of images) is not supported with a target time."""
        if target_timestep is not None:
            if isinstance(x[0], list):
                raise ValueError("target_timestep is not supported in Z-Image's omni mode (nested image lists)")
            check_target_timestep(t, target_timestep)
            t = DualTime(t, target_timestep, self._dual_time_embedding)
        return super().forward(x, t, cap_feats, *args, **kwargs)

    def _dual_time_embedding(self, primary: TimestepEmbedder, times: DualTime) -> torch.Tensor:
        """``E1(|t| s) + E2(tt s - t s) |t - tt|``, all in float64 (``E``'s own layers in their dtype).

        ``primary`` is the E1 module that was called (a peft wrapper may stand between it and the model).
        """
        if times.scale is None:
            raise RuntimeError("the parent forward did not scale the time before embedding it")
        s = times.scale
        if self.kernels == "triton":
            # float32 combine (the kernel's; eager's is float64: at most one float32 rounding apart).
            rule = self.fused_time_embed.rule
            if s != rule.time_scale:
                raise RuntimeError(f"the time was scaled by {s}, the fused rule by {rule.time_scale}")
            return self.fused_time_embed(times.timestep, times.target_timestep.to(times.timestep.device),
                                         primary.mlp[0].weight.dtype)
        t = times.timestep.to(torch.float64)
        tt = times.target_timestep.to(device=t.device, dtype=torch.float64)
        with torch.autocast(device_type=t.device.type, enabled=False):
            e1 = TimestepEmbedder.forward(primary, t.abs() * s)
            e2 = self.t_embedder_2(tt * s - t * s)
            return e1 + e2 * (t - tt).abs().unsqueeze(1)
