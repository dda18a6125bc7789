"""SD3 / SD3.5 transformer with TwinFlow's dual-time conditioning (ALGORITHM.md §2.1).

``temb = E1(T, pooled) + E2(TT, pooled) * (T - TT) / 1000``, where ``T = 1000 t`` and ``TT = 1000 tt`` are
signed times in the units diffusers' SD3 model takes (``StableDiffusion3Pipeline`` passes ``1000 sigma``;
:class:`~.backbone.SD3Backbone` does the scaling) and ``t``, ``tt`` the signed TwinFlow times: this is the reference's ``E1(1000t) + E2(1000tt)(t - tt)``.
``E1`` is the pretrained ``time_text_embed`` (a ``CombinedTimestepTextProjEmbeddings``: the timestep
MLP plus a projection of the pooled CLIP embedding); ``E2`` is a second one, ``time_text_embed_2``
(the reference's name), with its own pooled projection. The combine runs in float32 with one rounding
to the embedding dtype at the end. In single-embedder mode (``twin_embedder=False``, the reference's
LoRA configurations) there is no ``E2`` and ``E1`` receives ``T - TT/2``.

Design, as for Qwen-Image: only the time embedding differs from diffusers, so the parent's ``forward``
runs unchanged. The parent hands ``timestep`` straight to ``self.time_text_embed``; for a dual-time call
it receives a :class:`DualTime` in its place, which our subclass of diffusers' embedding module (same
parameters, same keys) recognises and hands back to the model. Nothing is stored between calls, and
with ``target_timestep=None`` the forward *is* diffusers' forward. With ``tt == t`` the extra term is
``E2 * 0`` (E2 finite), so the output equals diffusers' output exactly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from twinflow.kernels.dual_time_rule import SD35, CombineRule

from ..dual_time import (FusedTimeEmbedding, check_target_timestep, load_with_twin_embedder, normal_init_linears_,
                         parent_arguments)

TIME_SCALE = 1000.0
"""SD3 takes ``1000 sigma``; the backbone adapter scales TwinFlow's times by this."""
TWIN_PREFIX = "time_text_embed_2."
E2_INIT_STD = 0.02
_PARENT_FORWARD = inspect.signature(SD3Transformer2DModel.forward)


@dataclass(frozen=True)
class DualTime:
    """Stands in for ``timestep`` in the parent's forward and carries both times to the embedding."""

    timestep: torch.Tensor
    target_timestep: torch.Tensor
    compute: Callable[[CombinedTimestepTextProjEmbeddings, "DualTime", torch.Tensor], torch.Tensor]


class DualTimeAwareTextProjEmbeddings(CombinedTimestepTextProjEmbeddings):
    """diffusers' SD3 time + pooled-text embedding (identical parameters) that defers dual-time calls."""

    def forward(self, timestep, pooled_projection) -> torch.Tensor:
        if isinstance(timestep, DualTime):
            return timestep.compute(self, timestep, pooled_projection)
        return super().forward(timestep, pooled_projection)


class TwinFlowSD3Transformer(FusedTimeEmbedding, SD3Transformer2DModel):
    """``SD3Transformer2DModel`` plus ``time_text_embed_2`` and a ``target_timestep`` input.

    ``E2`` is initialised with normal(0, 0.02) weights and zero biases, as the reference does, not as a
    copy of ``E1`` (Qwen-Image's and Z-Image's choice); at ``t == tt`` its weights do not matter. Extra
    config key: ``twin_embedder`` (two embedders, or one that receives ``T - TT/2``). ``kernels``
    (``"eager"`` | ``"triton"``, not saved: see :class:`~..dual_time.FusedTimeEmbedding`): the fused
    kernel under its ``SD35`` rule; single-embedder mode has nothing to fuse and stays eager.
    """

    embedder_names = ("time_text_embed", "time_text_embed_2")

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        twin_embedder: bool = True,
        kernels: str = "eager",
    ):
        super().__init__(**parent_arguments(SD3Transformer2DModel, locals()))
        dims = {"embedding_dim": self.inner_dim, "pooled_projection_dim": pooled_projection_dim}
        self.time_text_embed = DualTimeAwareTextProjEmbeddings(**dims)
        if twin_embedder:
            self.time_text_embed_2 = CombinedTimestepTextProjEmbeddings(**dims)
            normal_init_linears_(self.time_text_embed_2, E2_INIT_STD)
        self.use_kernels(kernels)

    def fused_rule(self) -> CombineRule:
        return SD35

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; a plain SD3 checkpoint (no ``time_text_embed_2``) gets ``E2``
        initialised normal(0, 0.02) / zero bias from the global RNG (seed it for reproducibility)."""
        fill = lambda model: normal_init_linears_(model.time_text_embed_2, E2_INIT_STD)  # noqa: E731
        load = super().from_pretrained
        return load_with_twin_embedder(load, pretrained_model_name_or_path, kwargs, prefix=TWIN_PREFIX, fill=fill)

    def forward(self, *args, target_timestep: torch.Tensor | None = None, **kwargs):
        """diffusers' forward (same arguments) with an optional ``target_timestep`` (B,) beside ``timestep``
        (B,), both in SD3's units (``1000 t``). ``target_timestep=None`` is exactly the parent model."""
        if target_timestep is None:
            return super().forward(*args, **kwargs)
        call = _PARENT_FORWARD.bind(self, *args, **kwargs)
        check_target_timestep(call.arguments.get("timestep"), target_timestep)
        if "ip_adapter_image_embeds" in (call.arguments.get("joint_attention_kwargs") or {}):
            raise ValueError("target_timestep cannot be combined with IP-adapter image embeddings")
        call.arguments["timestep"] = DualTime(call.arguments["timestep"], target_timestep, self._dual_time_embedding)
        return super().forward(*call.args[1:], **call.kwargs)

    def _dual_time_embedding(
        self, primary: CombinedTimestepTextProjEmbeddings, times: DualTime, pooled: torch.Tensor
    ) -> torch.Tensor:
        """``E1(T, pooled) + E2(TT, pooled) (T - TT) / 1000`` (float32 combine), or ``E1(T - TT/2, pooled)``.

        ``primary`` is the E1 module that was called (a peft wrapper may stand between it and the model).
        """
        plain = CombinedTimestepTextProjEmbeddings.forward
        t = times.timestep
        tt = times.target_timestep.to(device=t.device, dtype=t.dtype)
        if not self.config.twin_embedder:
            return plain(primary, t - tt / 2, pooled)
        if self.kernels == "triton":
            extra = (primary.text_embedder(pooled), self.time_text_embed_2.text_embedder(pooled))
            return self.fused_time_embed(t, tt, pooled.dtype, extra=extra)
        e1 = plain(primary, t, pooled)
        e2 = self.time_text_embed_2(tt, pooled)
        coef = (t.float() - tt.float()) / TIME_SCALE
        return (e1.float() + e2.float() * coef.unsqueeze(-1)).to(e1.dtype)
