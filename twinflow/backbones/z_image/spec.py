"""Z-Image behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so only the light modules (config, condition) are imported at the
top; each method imports what it needs. What the diffusers families share is in
:class:`~twinflow.backbones.diffusers_family.DiffusersFamilySpec`; here is what is Z-Image's.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from twinflow.backbones.diffusers_family import DiffusersFamilySpec
from twinflow.backbones.dual_time import check_fused_lora
from twinflow.backbones.registry import CacheSchema, MemoryInventory, register_backbone
from twinflow.kernels.dual_time_rule import Z_IMAGE, CombineRule

from .condition import ZImageCondition
from .config import FAMILY, ZImageBackboneConfig


class ZImageCacheSchema(CacheSchema):
    """Caption embeddings stored ragged (``embeds`` + ``offsets``, valid tokens only, so no mask)."""

    format = "twinflow-z-image-cache"
    ragged = {"embeds": "offsets"}

    def rows(self, cond: ZImageCondition) -> list[dict[str, Any]]:
        return [{"embeds": cond.embeds[row][cond.mask[row]]} for row in range(len(cond))]

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> ZImageCondition:
        return ZImageCondition.cat([
            ZImageCondition(r["embeds"][None], torch.ones(1, r["embeds"].shape[0], dtype=torch.bool)) for r in rows
        ])

    def layout(self, cond: ZImageCondition) -> dict[str, Any]:
        return {"embed_dim": int(cond.embeds.shape[-1]), "has_ref": False}

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        return False


LATENT_FACTOR = 8
"""Pixels per latent side: the Flux VAE's 8x compression."""


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@register_backbone(FAMILY)
class ZImageSpec(DiffusersFamilySpec):
    config_type = ZImageBackboneConfig
    condition_type = ZImageCondition
    cache_schema = ZImageCacheSchema()
    transformer_class_names = ("ZImageTransformer2DModel", "TwinFlowZImageTransformer")
    conditioner_name = "ZImageConditioner"
    patch_setting = "all_patch_size"
    text_width_setting = "cap_feat_dim"
    time_embed_2 = "t_embedder_2"

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[ZImageBackboneConfig, Any], Any]:
        from . import build  # imported before the trainer enters zero.Init (see .build)

        return build.build_z_image_backbone

    def dual_time_rule(self, config: ZImageBackboneConfig) -> Optional[CombineRule]:
        """``E1(|t| s) + E2((tt - t) s) |t - tt|`` on Z-Image's clock (the adapter maps TwinFlow's times):
        the kernel's ``Z_IMAGE``."""
        return Z_IMAGE

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        name = _dtype_name(dtype)
        return self.conditioner_class().from_pretrained(folder, device=device, text_encoder_dtype=name, vae_dtype=name)

    # ----------------------------------------------------------------------------------- checks
    def check_model_files(self, config: ZImageBackboneConfig) -> None:
        linears = tuple(f"{name}.mlp.{i}" for name in ("t_embedder", "t_embedder_2") for i in (0, 2))
        check_fused_lora(self, config, linears)
        super().check_model_files(config)

    def patch_of(self, model: Mapping[str, Any]) -> int:
        return int(model["all_patch_size"][0])

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: ZImageBackboneConfig) -> list[str]:
        from .lora import lora_config

        return sorted(lora_config(config.lora).target_modules)

    # ------------------------------------------------------------------------ memory and export
    # The bodies live in .memory and .export (heavy imports); the seam's signatures are kept here.
    def memory_inventory(self, config: ZImageBackboneConfig) -> MemoryInventory:
        """Not an MMDiT: ``layers.`` blocks plus refiners (see :func:`.memory.memory_inventory`)."""
        return self.family_module("memory").memory_inventory(config)

    def latent_factor(self) -> int:
        return LATENT_FACTOR

    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        from .encoders import DEFAULT_SEQUENCE_LENGTH

        return DEFAULT_SEQUENCE_LENGTH if fingerprint is None else int(fingerprint["max_sequence_length"])

    def export_keys(self, transformer_config: Mapping[str, Any], config: ZImageBackboneConfig) -> set[str]:
        from . import export

        return export.export_keys(transformer_config, config)
