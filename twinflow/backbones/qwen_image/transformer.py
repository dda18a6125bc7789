"""Qwen-Image transformer with TwinFlow's dual-time conditioning (ALGORITHM.md §2).

``temb = E1(t) + E2(tt) * (t - tt)``: ``E1`` is the pretrained ``time_text_embed``; ``E2`` is a second
embedder of the same shape stored as ``time_text_embed_2`` (the name the published TwinFlow-Qwen-Image
weights use) and initialised as a copy of ``E1``. In single-embedder mode (``twin_embedder=False``, the
reference's LoRA configurations) there is no ``E2`` and ``E1`` receives ``t - tt/2``.

Design: only the time embedding differs from diffusers, so the parent's ``forward`` runs unchanged. The
parent computes ``self.time_text_embed(timestep, hidden_states, additional_t_cond)``; our
``time_text_embed`` is a subclass of diffusers' embedding module (same parameters, same state-dict keys)
that recognises a :class:`DualTimeRequest` passed through ``additional_t_cond`` and hands the computation
back to the model. Nothing is stored on the model between calls (no hooks, no mutable state), and with
``target_timestep=None`` the forward *is* diffusers' forward. With ``tt == t`` the extra term is
``E2(t) * 0``, so the output equals diffusers' output bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    QwenTimestepProjEmbeddings,
)

from twinflow.backbones.dual_time import load_with_twin_embedder

from .attention import plan_packing, uses_packed_attention
from twinflow.utils.partitioned import gathered

KERNEL_CHOICES = ("eager", "triton")
TWIN_PREFIX = "time_text_embed_2."


@dataclass(frozen=True)
class DualTimeRequest:
    """Carries the target time through the parent's ``additional_t_cond`` argument to the time embedding."""

    target_timestep: torch.Tensor
    additional_t_cond: Any
    compute: Callable[..., torch.Tensor]


class DualTimeAwareEmbeddings(QwenTimestepProjEmbeddings):
    """diffusers' time embedding (identical parameters) that defers to the model for dual-time requests."""

    def forward(self, timestep, hidden_states, addition_t_cond=None) -> torch.Tensor:
        if isinstance(addition_t_cond, DualTimeRequest):
            return addition_t_cond.compute(timestep, hidden_states, addition_t_cond)
        return super().forward(timestep, hidden_states, addition_t_cond)


def embed_time(embedder: QwenTimestepProjEmbeddings, tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``E(tau)``: sinusoid (scaled by 1000) then the two-layer MLP, exactly as diffusers computes it.

    Calls the sub-modules (not ``embedder.forward``) so ZeRO-3 gathers their parameters through their
    own hooks.
    """
    return embedder.timestep_embedder(embedder.time_proj(tau).to(dtype=dtype))


def copy_embedder_(src: QwenTimestepProjEmbeddings, dst: QwenTimestepProjEmbeddings) -> None:
    """``dst.timestep_embedder <- src.timestep_embedder`` (works on ZeRO-3 partitioned parameters)."""
    pairs = list(zip(src.timestep_embedder.parameters(), dst.timestep_embedder.parameters()))
    with gathered([p for pair in pairs for p in pair], modify=True), torch.no_grad():
        for p_src, p_dst in pairs:
            p_dst.copy_(p_src)


class TwinFlowQwenImageTransformer(QwenImageTransformer2DModel):
    """``QwenImageTransformer2DModel`` plus ``time_text_embed_2`` and a ``target_timestep`` input.

    Extra config keys (saved in ``config.json``): ``twin_embedder`` (two embedders, or one that receives
    ``t - tt/2``) and ``kernels`` (``"eager"`` or ``"triton"``: the fused dual-time embedding of
    ``twinflow.kernels.dual_time_embedding``; single-embedder mode has nothing to fuse and stays eager).
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        twin_embedder: bool = True,
        kernels: str = "eager",
    ):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if guidance_embeds:
            raise ValueError("TwinFlowQwenImageTransformer does not support guidance_embeds=True")
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
            zero_cond_t=zero_cond_t,
            use_additional_t_cond=use_additional_t_cond,
            use_layer3d_rope=use_layer3d_rope,
        )
        self.time_text_embed = DualTimeAwareEmbeddings(self.inner_dim, use_additional_t_cond=use_additional_t_cond)
        if twin_embedder:
            # The additional-t embedding (Qwen-Image-Layered) is added once, through E1.
            self.time_text_embed_2 = QwenTimestepProjEmbeddings(self.inner_dim)
            copy_embedder_(self.time_text_embed, self.time_text_embed_2)
            if kernels == "triton":
                self.bind_fused_time_embedding()

    def bind_fused_time_embedding(self) -> None:
        """(Re)create the fused dual-time embedding over the *current* embedder modules.

        The kernel module reads the weights of embedders it does not own (no state-dict keys of its
        own) and must be a submodule so that ZeRO-3 gathers those weights through its hooks. Call this
        again after anything replaces an embedder module (peft wrapping ``time_text_embed_2``).
        The import is lazy: Triton's interpreter mode must be chosen before the first kernel import.
        """
        from twinflow.kernels.dual_time_embedding import DualTimestepEmbedding

        self.fused_time_embed = DualTimestepEmbedding(self.time_text_embed, self.time_text_embed_2, backend="triton")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, then ``time_text_embed_2 <- time_text_embed`` if the checkpoint
        is a plain Qwen-Image one (lacks ``time_text_embed_2``).

        Works with ``low_cpu_mem_usage`` (missing weights are left on the meta device by diffusers and
        are materialised here). A checkpoint that has ``time_text_embed_2`` keeps its values; one that has
        only some of its keys is an error.
        """
        fill = lambda model: model._init_twin_embedder_from_primary()  # noqa: E731
        load = super().from_pretrained
        return load_with_twin_embedder(load, pretrained_model_name_or_path, kwargs, prefix=TWIN_PREFIX, fill=fill)

    def _init_twin_embedder_from_primary(self) -> None:
        """Replace ``time_text_embed_2``'s weights (possibly on the meta device) by copies of E1's."""
        source = self.time_text_embed.timestep_embedder.state_dict()
        self.time_text_embed_2.timestep_embedder.load_state_dict(
            {k: v.detach().clone() for k, v in source.items()}, assign=True
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        timestep: torch.Tensor = None,
        img_shapes: list | None = None,
        guidance: torch.Tensor = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        return_dict: bool = True,
        target_timestep: torch.Tensor | None = None,
    ):
        """diffusers' forward with an optional ``target_timestep`` (B,) beside ``timestep`` (B,).

        ``target_timestep=None`` is exactly the parent model (the time embedding sees ``timestep`` only).
        With a text mask and packed attention (:func:`~.attention.configure_attention`), the packing plan is
        built here once and reaches every block through ``attention_kwargs``.
        """
        if target_timestep is not None:
            if timestep is None or target_timestep.shape != timestep.shape:
                raise ValueError(
                    f"target_timestep shape {tuple(target_timestep.shape)} must equal timestep shape "
                    f"{None if timestep is None else tuple(timestep.shape)}"
                )
            additional_t_cond = DualTimeRequest(target_timestep, additional_t_cond, self._dual_time_embedding)
        if encoder_hidden_states_mask is not None and uses_packed_attention(self):
            # One packing plan (one host copy of the mask) for all blocks, instead of one per block.
            plan = plan_packing(encoder_hidden_states_mask, hidden_states.shape[1])
            attention_kwargs = {**(attention_kwargs or {}), "pack_plan": plan}
        return super().forward(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            timestep=timestep,
            img_shapes=img_shapes,
            guidance=guidance,
            attention_kwargs=attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            additional_t_cond=additional_t_cond,
            return_dict=return_dict,
        )

    def _dual_time_embedding(
        self, timestep: torch.Tensor, hidden_states: torch.Tensor, request: DualTimeRequest
    ) -> torch.Tensor:
        """The time embedding for ``(t, tt)``; ``timestep`` arrives as the parent prepared it (cast to the
        hidden dtype; doubled with zeros when ``zero_cond_t``), and ``tt`` is prepared the same way."""
        dtype = hidden_states.dtype
        target = request.target_timestep.to(device=timestep.device, dtype=timestep.dtype)
        if self.zero_cond_t:
            target = torch.cat([target, target * 0], dim=0)
        primary = self.time_text_embed
        if not self.config.twin_embedder:
            temb = embed_time(primary, timestep - target / 2, dtype)
        elif self.config.kernels == "triton":
            temb = self.fused_time_embed(timestep, target, dtype)
        else:
            temb = embed_time(primary, timestep, dtype) + embed_time(self.time_text_embed_2, target, dtype) * (
                timestep - target
            ).unsqueeze(-1)
        if primary.use_additional_t_cond:
            if request.additional_t_cond is None:
                raise ValueError("use_additional_t_cond=True: additional_t_cond must be provided")
            temb = temb + primary.addition_t_embedding(request.additional_t_cond).to(dtype)
        return temb
