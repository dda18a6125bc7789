"""Z-Image behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so only the light modules (config, condition) are imported at the
top; each method imports what it needs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from twinflow.backbones.registry import (
    BackboneSpec,
    CacheSchema,
    DataShapes,
    MemoryInventory,
    register_backbone,
)
from twinflow.kernels.dual_time_rule import Z_IMAGE, CombineRule
from twinflow.utils.typed_config import ConfigError

from .condition import ZImageCondition
from .config import FAMILY, ZImageBackboneConfig, check_kernels


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


def _encoders() -> Any:
    from . import encoders

    return encoders


LATENT_FACTOR = 8
"""Pixels per latent side: the Flux VAE's 8x compression."""


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@register_backbone(FAMILY)
class ZImageSpec(BackboneSpec):
    config_type = ZImageBackboneConfig
    condition_type = ZImageCondition
    cache_schema = ZImageCacheSchema()
    transformer_class_names = ("ZImageTransformer2DModel", "TwinFlowZImageTransformer")

    @property
    def encoder_config_type(self) -> type:  # type: ignore[override]
        return _encoders().EncoderConfig  # imports transformers/diffusers: only on use

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[ZImageBackboneConfig, Any], Any]:
        from . import build  # imported before the trainer enters zero.Init (see .build)

        return build.build_z_image_backbone

    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        return self.builder()(ZImageBackboneConfig(pretrained=folder, dtype=dtype), device)

    def dual_time_rule(self, config: ZImageBackboneConfig) -> Optional[CombineRule]:
        """``E1(|t| s) + E2((tt - t) s) |t - tt|`` on Z-Image's clock (the adapter maps TwinFlow's times):
        the kernel's ``Z_IMAGE``."""
        return Z_IMAGE

    def tiny_config(self) -> dict[str, Any]:
        from .tiny import tiny_transformer_config

        return {"family": FAMILY, "transformer": tiny_transformer_config(), "dtype": "float32"}

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_config(self, encoder: Any, device: Any, given: Any = None) -> Any:
        return _encoders().ZImageConditioner.from_config(encoder, device=device) if given is None else given

    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        name = _dtype_name(dtype)
        return _encoders().ZImageConditioner.from_pretrained(folder, device=device, text_encoder_dtype=name, vae_dtype=name)

    def conditioner_from_fingerprint(self, fingerprint: Mapping[str, Any]) -> Any:
        keys = ("max_sequence_length", "negative_prompt", "text_encoder_dtype", "vae_dtype")
        return _encoders().ZImageConditioner.from_pretrained(fingerprint["model_path"], **{k: fingerprint[k] for k in keys})

    def encoder_fingerprint(self, encoder: Any) -> dict[str, Any]:
        from pathlib import Path

        keys = ("max_sequence_length", "negative_prompt", "text_encoder_dtype", "vae_dtype")
        return {"model_path": str(Path(encoder.model_path).resolve()), **{k: getattr(encoder, k) for k in keys}}

    def encoder_takes_reference(self, encoder: Any) -> bool:
        return False

    # ----------------------------------------------------------------------------------- checks
    def check_model_files(self, config: ZImageBackboneConfig) -> None:
        check_kernels(config.kernels)
        try:
            config.transformer_settings()
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key '", "config key 'model.", 1)) from e

    def check_data_shapes(self, config: ZImageBackboneConfig, shapes: DataShapes, *, read_files: bool) -> None:
        if config.transformer is None and not read_files:
            return
        model = config.transformer_settings()
        where = "model.transformer" if config.transformer is not None else f"model.pretrained ({config.pretrained})"
        if shapes.latent_channels != int(model["in_channels"]):
            raise ConfigError(f"config key '{shapes.channels_key}' gives {shapes.latent_channels} latent channels but "
                              f"{where} takes {model['in_channels']} (in_channels)")
        patch = int(model["all_patch_size"][0])
        if shapes.height % patch or shapes.width % patch:
            raise ConfigError(f"config key '{shapes.size_key}': latents of {shapes.height}x{shapes.width} do not split "
                              f"into {patch}x{patch} patches ({where}.all_patch_size)")
        text_dim = int(shapes.layout["embed_dim"])
        if text_dim != int(model["cap_feat_dim"]):
            raise ConfigError(f"config key '{shapes.layout_key}' gives text embeddings of width {text_dim} but {where} "
                              f"takes {model['cap_feat_dim']} (cap_feat_dim)")

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: ZImageBackboneConfig) -> list[str]:
        from .lora import lora_config

        return sorted(lora_config(config.lora).target_modules)

    # ------------------------------------------------------------------------ memory and export
    # The bodies live in .memory and .export (heavy imports); the seam's signatures are kept here.
    def memory_inventory(self, config: ZImageBackboneConfig) -> MemoryInventory:
        from . import memory

        return memory.memory_inventory(config)

    def encoder_params(self) -> dict[str, int]:
        from . import memory

        return memory.encoder_params()

    def latent_factor(self) -> int:
        return LATENT_FACTOR

    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        from .encoders import DEFAULT_SEQUENCE_LENGTH

        return DEFAULT_SEQUENCE_LENGTH if fingerprint is None else int(fingerprint["max_sequence_length"])

    def export_keys(self, transformer_config: Mapping[str, Any], config: ZImageBackboneConfig) -> set[str]:
        from . import export

        return export.export_keys(transformer_config, config)

    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        from . import export

        export.write_transformer(state, transformer_config, config, folder, weights=weights, merge_lora=merge_lora)
