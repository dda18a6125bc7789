"""SANA transformer with TwinFlow's dual-time conditioning (ALGORITHM.md §2.1, the SANA row).

SANA's time embedding is an ``AdaLayerNormSingle`` with two outputs: the modulation vector (6 x D, for
every block) and the embedded timestep (D, for the output norm). The second embedder ``time_embed_2``
(the name the reference's TwinFlow-OpenUni checkpoints use) has the same shape; both outputs combine as

    out(t, tt) = out_1(T) + out_2(TT) * (T - TT) / 1000,    T = 1000 t, TT = 1000 tt,

which is ``out_1 + out_2 * (t - tt)`` written the way the reference computes it (it receives timesteps
already multiplied by 1000, as diffusers' SANA pipeline passes them). ``time_embed_2`` starts from
normal(0, 0.02) weights and zero biases, as the reference's ``init_time_embed_2_weights``. With
``twin_embedder=False`` (LoRA recipes that keep the original transformer) there is no second embedder
and the single one receives ``T - TT/2``, the project's single-embedder rule (ALGORITHM.md §2).

Design, as for Qwen-Image: only the time embedding differs from diffusers, so the parent's ``forward``
runs unchanged. The parent hands ``timestep`` untouched to ``self.time_embed``; a :class:`DualTimeRequest`
travels in its place and our ``time_embed`` (a subclass of diffusers' module, same parameters and keys)
hands the computation back to the model. Nothing is stored between calls. At ``t == tt`` the extra term
is ``out_2 * 0``, so the output equals diffusers' bit for bit, whatever ``time_embed_2`` holds.

``kernels="triton"`` (:class:`~..dual_time.FusedTimeEmbedding`, not saved in ``config.json``): the fused
kernel computes both embedded timesteps ``emb_i`` (the timestep MLPs, ``time_embed.emb`` and
``time_embed_2.emb``) and their combine under its ``SANA`` rule, and returns ``emb_1``, ``emb_2`` too;
the modulation ``linear(silu(emb_i))`` runs here through each embedder's own ``linear`` (a 6D x D
product, left to cuBLAS, and free to carry LoRA) and combines with the same coefficient as in eager
mode. At ``t == tt`` the fused outputs are the kernel's ``emb_1`` and ``linear(silu(emb_1))`` exactly;
``emb_1`` equals diffusers' timestep MLP up to float32 summation order (the kernel tests' bound).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel
from torch import nn

from twinflow.kernels.dual_time_rule import SANA, CombineRule
from twinflow.utils.partitioned import gathered
from twinflow.backbones.dual_time import KERNEL_CHOICES  # noqa: F401 (the choices, as this module's name)
from twinflow.backbones.dual_time import FusedTimeEmbedding, load_with_twin_embedder, parent_arguments

from .lora import TIME_EMBED_2

TWIN_PREFIX = TIME_EMBED_2 + "."
FUSED_TIME_LINEARS: tuple[str, ...] = tuple(
    f"{name}.emb.timestep_embedder.linear_{i}" for name in ("time_embed", TIME_EMBED_2) for i in (1, 2))
"""The linears whose weights ``kernels="triton"`` reads directly (LoRA must not wrap them; see
``check_fused_lora``): both embedders' timestep MLPs. The modulation linears ``time_embed.linear`` and
``time_embed_2.linear`` are called as modules on the kernel's outputs, so LoRA on them is compatible."""
TIME_SCALE = 1000.0
"""SANA's timesteps are ``1000 t``; the coefficient ``(T - TT) / TIME_SCALE`` is ``t - tt``."""
TIME_EMBED_2_STD = 0.02


@dataclass(frozen=True)
class DualTimeRequest:
    """Stands in for ``timestep`` in the parent's forward and reaches the time embedding."""

    timestep: torch.Tensor
    target_timestep: torch.Tensor
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]


class DualTimeAwareAdaLayerNormSingle(AdaLayerNormSingle):
    """diffusers' ``AdaLayerNormSingle`` (identical parameters) that defers dual-time requests to the model."""

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        if isinstance(timestep, DualTimeRequest):
            return timestep.compute(timestep, batch_size, hidden_dtype)
        return super().forward(timestep, added_cond_kwargs, batch_size, hidden_dtype)


def init_time_embed_2_(module: nn.Module, std: float = TIME_EMBED_2_STD) -> None:
    """Every linear layer of ``module``: weights normal(0, ``std``), biases zero (ZeRO-3 safe).

    Weights left on the meta device (diffusers' ``low_cpu_mem_usage`` loading of a checkpoint without
    them) are first given storage on the device of the module's other tensors (CPU if none).
    """
    if any(p.is_meta for p in module.parameters()):
        real = [p.device for p in module.parameters() if not p.is_meta]
        module.to_empty(device=real[0] if real else "cpu")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with gathered([p for m in linears for p in m.parameters()], modify=True), torch.no_grad():
        for linear in linears:
            linear.weight.normal_(0.0, std)
            if linear.bias is not None:
                linear.bias.zero_()


class TwinFlowSanaTransformer(FusedTimeEmbedding, SanaTransformer2DModel):
    """``SanaTransformer2DModel`` plus ``time_embed_2`` and a ``target_timestep`` input.

    Extra config key: ``twin_embedder``. ``kernels`` (``"eager"`` | ``"triton"``, not saved: see
    :class:`~..dual_time.FusedTimeEmbedding`; a ``config.json`` written while it was saved, always
    ``"eager"``, still loads, see :meth:`extract_init_dict`): the fused kernel under its ``SANA`` rule.
    Single-embedder mode has nothing to fuse and stays eager.
    """

    embedder_names = ("time_embed", TIME_EMBED_2)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        twin_embedder: bool = True,
        kernels: str = "eager",
    ) -> None:
        if guidance_embeds:
            raise ValueError("TwinFlowSanaTransformer does not support guidance_embeds=True")
        # Every argument but the two TwinFlow keys goes to diffusers' SANA unchanged.
        super().__init__(**parent_arguments(SanaTransformer2DModel, locals()))
        inner_dim = num_attention_heads * attention_head_dim
        self.time_embed = DualTimeAwareAdaLayerNormSingle(inner_dim)
        if twin_embedder:
            self.time_embed_2 = AdaLayerNormSingle(inner_dim)
            init_time_embed_2_(self.time_embed_2)
        self.use_kernels(kernels)

    def fused_rule(self) -> CombineRule:
        return SANA

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' reading of a configuration, minus the ``"kernels": "eager"`` this class wrote to
        ``config.json`` while the choice was a config key (kept, diffusers would warn about it and
        carry it into the next saved ``config.json``). No code wrote another value: one is refused."""
        if "kernels" in config_dict:
            config_dict = dict(config_dict)
            if (value := config_dict.pop("kernels")) != "eager":
                raise ValueError(f"config.json key 'kernels' is {value!r}: the SANA transformer's kernels are not "
                                 "a model config key (only the 'eager' older folders hold is accepted); choose "
                                 "them with the training config's 'kernels' or use_kernels(), and remove the key")
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; a plain SANA checkpoint (no ``time_embed_2``) gets a fresh
        ``time_embed_2`` initialised as in the reference. A checkpoint with only part of it is an error."""
        fill = lambda model: model._init_time_embed_2()  # noqa: E731
        load = super().from_pretrained
        return load_with_twin_embedder(load, pretrained_model_name_or_path, kwargs, prefix=TWIN_PREFIX, fill=fill)

    def _init_time_embed_2(self) -> None:
        """Fresh ``time_embed_2`` (possibly on the meta device after loading) in the model's dtype."""
        init_time_embed_2_(self.time_embed_2)
        self.time_embed_2.to(dtype=self.time_embed.linear.weight.dtype)

    def forward(self, hidden_states, encoder_hidden_states, timestep, *args, target_timestep=None, **kwargs):
        """diffusers' forward (every other argument passed through) with an optional ``target_timestep``
        (B,) beside ``timestep`` (B,), both in SANA's units (``1000 t``). ``target_timestep=None`` is
        exactly the parent model."""
        if target_timestep is not None:
            if target_timestep.shape != timestep.shape:
                raise ValueError(
                    f"target_timestep shape {tuple(target_timestep.shape)} must equal timestep shape "
                    f"{tuple(timestep.shape)}"
                )
            timestep = DualTimeRequest(timestep, target_timestep, self._dual_time_embedding)
        return super().forward(hidden_states, encoder_hidden_states, timestep, *args, **kwargs)

    def _dual_time_embedding(
        self, request: DualTimeRequest, batch_size: int, hidden_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation, embedded timestep) for ``(T, TT)``. The sums are formed in the promoted dtype of
        the time coefficient and rounded once to the embedder's output dtype, so ``T == TT`` returns the
        primary embedder's outputs exactly. With ``kernels="triton"`` the embedded timesteps and their
        sum come from the fused kernel (its ``SANA`` rule: the same float32 combine for float32 times),
        the modulation from them as below."""
        t = request.timestep
        tt = request.target_timestep.to(device=t.device, dtype=t.dtype)
        embed = super(DualTimeAwareAdaLayerNormSingle, self.time_embed).forward
        if not self.config.twin_embedder:
            return embed(t - tt / 2, batch_size=batch_size, hidden_dtype=hidden_dtype)
        coefficient = ((t - tt) / TIME_SCALE).unsqueeze(1)
        if self.kernels == "triton":
            dtype = hidden_dtype or self.time_embed.emb.timestep_embedder.linear_1.weight.dtype
            emb, (emb_1, emb_2) = self.fused_time_embed(t, tt, dtype, with_parts=True)
            mod_1 = self.time_embed.linear(self.time_embed.silu(emb_1))  # AdaLayerNormSingle's modulation
            mod_2 = self.time_embed_2.linear(self.time_embed_2.silu(emb_2))
            return _combine(mod_1, mod_2, coefficient), emb
        mod_1, emb_1 = embed(t, batch_size=batch_size, hidden_dtype=hidden_dtype)
        mod_2, emb_2 = self.time_embed_2(tt, batch_size=batch_size, hidden_dtype=hidden_dtype)
        return _combine(mod_1, mod_2, coefficient), _combine(emb_1, emb_2, coefficient)


def _combine(first: torch.Tensor, second: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``first + second * coefficient`` in the promoted dtype, rounded once to ``first``'s dtype."""
    return (first + second * coefficient).to(first.dtype)
