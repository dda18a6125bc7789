"""SD3.5 (Medium) behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so only the light modules (config, condition) are imported at the
top; each method imports what it needs. Where SD3.5 works as Qwen-Image does (LoRA injection, export
layout, streamed checkpoint loading), Qwen-Image's code is reused with SD3's classes; what the diffusers
families share is in :class:`~twinflow.backbones.diffusers_family.DiffusersFamilySpec`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from twinflow.backbones.diffusers_family import DiffusersFamilySpec
from twinflow.backbones.dual_time import check_fused_lora
from twinflow.backbones.registry import CacheSchema, DataShapes, register_backbone
from twinflow.kernels.dual_time_rule import SD35, CombineRule
from twinflow.utils.typed_config import ConfigError

from ..qwen_image.config import DTYPES
from .condition import SD3Condition
from .config import FAMILY, SD35BackboneConfig


class SD3CacheSchema(CacheSchema):
    """Every field stacked: SD3 pads each prompt to the same length and attends to the padding, so the
    joint ``embeds`` (L, D), the ``pooled`` (P) embedding and the tokenizers' ``mask`` (L) are stored
    whole. The unconditional condition (the negative prompt) is stored once, as for Qwen-Image."""

    format = "twinflow-sd35-cache"
    ragged: Mapping[str, str] = {}
    shared_with_uncond = ()

    def rows(self, cond: SD3Condition) -> list[dict[str, Any]]:
        out = []
        for row in range(len(cond)):
            fields = {"embeds": cond.embeds[row], "pooled": cond.pooled[row]}
            if cond.mask is not None:
                fields["mask"] = cond.mask[row]
            out.append(fields)
        return out

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> SD3Condition:
        if any("pooled" not in r for r in rows):
            raise ValueError("SD3.5 conditions need pooled text embeddings: train from a cache built by the sd35 encoders")
        masks = [r.get("mask") for r in rows]
        mask = None if any(m is None for m in masks) else torch.stack(masks)
        return SD3Condition(torch.stack([r["embeds"] for r in rows]), torch.stack([r["pooled"] for r in rows]), mask)

    def layout(self, cond: SD3Condition) -> dict[str, Any]:
        return {"embed_dim": int(cond.embeds.shape[-1]), "pooled_dim": int(cond.pooled.shape[-1]),
                "text_length": int(cond.embeds.shape[1]), "has_ref": False}

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        return False


@register_backbone(FAMILY)
class SD35Spec(DiffusersFamilySpec):
    config_type = SD35BackboneConfig
    condition_type = SD3Condition
    cache_schema = SD3CacheSchema()
    conditioner_name = "SD3Conditioner"

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[SD35BackboneConfig, Any], Any]:
        from .build import build_sd35_backbone

        return build_sd35_backbone

    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        return self.builder()(SD35BackboneConfig(pretrained=folder, dtype=dtype, twin_embedder=_twin_embedder(folder)),
                              device)

    def dual_time_rule(self, config: SD35BackboneConfig) -> Optional[CombineRule]:
        """In the times the transformer receives (``T = 1000 t``, scaled by the adapter):
        ``E1(T, pooled) + E2(TT, pooled) (T - TT) / 1000`` (the kernel's ``SD35``); without the twin
        embedder, None (``E1(T - TT/2, pooled)``)."""
        return SD35 if config.twin_embedder else None

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        name = next(k for k, v in DTYPES.items() if v == dtype)
        return self.conditioner_class().from_pretrained(folder, device=device, text_encoder_dtype=name, vae_dtype=name)

    # ----------------------------------------------------------------------------------- checks
    def check_model_files(self, config: SD35BackboneConfig) -> None:
        embedders = ("time_text_embed", "time_text_embed_2")[:1 + config.twin_embedder]
        linears = tuple(f"{name}.timestep_embedder.linear_{i}" for name in embedders for i in (1, 2))
        check_fused_lora(self, config, linears)
        super().check_model_files(config)

    def check_layout(self, shapes: DataShapes) -> None:
        if "pooled_dim" not in shapes.layout:
            raise ConfigError(f"config key '{shapes.layout_key}': SD3.5 needs pooled text embeddings, which only a "
                              "cache built by the sd35 encoders holds (data.cache_dir, not synthetic_data)")

    def check_text_widths(self, model: Mapping[str, Any], shapes: DataShapes, where: str) -> None:
        for key, setting in (("embed_dim", "joint_attention_dim"), ("pooled_dim", "pooled_projection_dim")):
            if int(shapes.layout[key]) != int(model[setting]):
                raise ConfigError(f"config key '{shapes.layout_key}' gives {key} {shapes.layout[key]} but {where} "
                                  f"takes {model[setting]} ({setting})")

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: SD35BackboneConfig) -> list[str]:
        from ..qwen_image.lora import lora_config

        return sorted(lora_config(config.lora, dropout=0.0).target_modules)

    # ------------------------------------------------------------------------------------ memory
    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        """77 CLIP tokens plus T5's ``max_sequence_length`` (every prompt is padded to that)."""
        from .encoders import DEFAULT_SEQUENCE_LENGTH

        length = DEFAULT_SEQUENCE_LENGTH if fingerprint is None else int(fingerprint["max_sequence_length"])
        return 77 + length

    # ------------------------------------------------------------------------------------ export
    def export_keys(self, transformer_config: Mapping[str, Any], config: SD35BackboneConfig) -> set[str]:
        """The exported state's keys but the position table, which a checkpoint never holds (a buffer)."""
        from ..qwen_image.export import plain_transformer
        from .transformer import TwinFlowSD3Transformer

        return set(plain_transformer(transformer_config, config, cls=TwinFlowSD3Transformer).state_dict()) - {POS_EMBED}

    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        """diffusers' SD3 layout: the transformer folder (E2 under ``time_text_embed_2.*``), or for LoRA
        the adapter in ``StableDiffusion3Pipeline``'s LoRA format under ``lora/`` (+ ``transformer/``)."""
        from diffusers import StableDiffusion3Pipeline

        from ..qwen_image.export import plain_transformer, save_transformer
        from .transformer import TwinFlowSD3Transformer

        state = {POS_EMBED: _position_table(transformer_config), **state}
        save_transformer(plain_transformer(transformer_config, config, cls=TwinFlowSD3Transformer), state, config,
                         folder, pipeline=StableDiffusion3Pipeline, weights=weights, merge_lora=merge_lora)


POS_EMBED = "pos_embed.pos_embed"
"""SD3's fixed sin-cos position table: a persistent buffer, in the saved model but never trained."""


def _position_table(transformer_config: Mapping[str, Any]) -> torch.Tensor:
    """The position table of a transformer of ``transformer_config``, computed as its ``PatchEmbed`` does."""
    from diffusers.models.embeddings import PatchEmbed

    c = transformer_config
    embed = PatchEmbed(height=c["sample_size"], width=c["sample_size"], patch_size=c["patch_size"],
                       in_channels=c["in_channels"], embed_dim=c["num_attention_heads"] * c["attention_head_dim"],
                       pos_embed_max_size=c["pos_embed_max_size"])
    return embed.pos_embed

def _twin_embedder(folder: str) -> bool:
    """Whether the model in ``folder`` has the second embedder: its config says so; a plain SD3 folder
    (no ``twin_embedder`` key) is loaded with one, initialised as the transformer's ``from_pretrained`` does."""
    import json

    from .config import resolve_pretrained_dir

    return bool(json.loads((resolve_pretrained_dir(folder) / "config.json").read_text()).get("twin_embedder", True))
