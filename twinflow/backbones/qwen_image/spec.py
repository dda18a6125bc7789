"""Qwen-Image / Qwen-Image-Edit behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so it imports only the light modules (config, condition) at the
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
from twinflow.kernels.dual_time_rule import QWEN_IMAGE, CombineRule
from twinflow.utils.typed_config import ConfigError

from .condition import QwenCondition
from .config import FAMILY, QwenImageBackboneConfig


def _single(embeds: torch.Tensor, ref: torch.Tensor | None) -> QwenCondition:
    mask = torch.ones(1, embeds.shape[0], dtype=torch.bool)
    return QwenCondition(embeds[None], mask, None if ref is None else ref[None])


class QwenCacheSchema(CacheSchema):
    """Text embeddings stored ragged (``embeds`` + ``offsets``, valid tokens only, so no mask) and, for
    edit, the reference latents (``ref_latents``), which the unconditional condition shares."""

    format = "twinflow-qwen-image-cache"
    ragged = {"embeds": "offsets"}
    shared_with_uncond = ("ref_latents",)

    def rows(self, cond: QwenCondition) -> list[dict[str, Any]]:
        out = []
        for row in range(len(cond)):
            fields = {"embeds": cond.embeds[row][cond.mask[row]]}
            if cond.ref_latents is not None:
                fields["ref_latents"] = cond.ref_latents[row]
            out.append(fields)
        return out

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> QwenCondition:
        return QwenCondition.cat([_single(r["embeds"], r.get("ref_latents")) for r in rows])

    def layout(self, cond: QwenCondition) -> dict[str, Any]:
        return {"embed_dim": int(cond.embeds.shape[-1]), "has_ref": cond.ref_latents is not None}

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        return bool(layout["has_ref"])


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_backbone(FAMILY)
class QwenImageSpec(BackboneSpec):
    config_type = QwenImageBackboneConfig
    condition_type = QwenCondition
    cache_schema = QwenCacheSchema()

    @property
    def encoder_config_type(self) -> type:  # type: ignore[override]
        from .encoders import EncoderConfig

        return EncoderConfig

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[QwenImageBackboneConfig, Any], Any]:
        from .build import build_qwen_image_backbone

        return build_qwen_image_backbone

    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        return self.builder()(QwenImageBackboneConfig(pretrained=folder, dtype=dtype), device)

    def dual_time_rule(self, config: QwenImageBackboneConfig) -> Optional[CombineRule]:
        """``E1(t) + E2(tt) (t - tt)`` (the kernel's ``QWEN_IMAGE``); without the twin embedder, None
        (``E1(t - tt/2)``, no second term)."""
        return QWEN_IMAGE if config.twin_embedder else None

    def tiny_config(self) -> dict[str, Any]:
        from .tiny import tiny_transformer_config

        return {"family": FAMILY, "transformer": tiny_transformer_config(), "dtype": "float32"}

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_config(self, encoder: Any, device: Any, given: Any = None) -> Any:
        from .encoders import QwenImageConditioner

        if given is None:
            return QwenImageConditioner.from_config(encoder, device=device)
        if given.variant != encoder.variant:
            raise ValueError(f"conditioner variant {given.variant!r} != encoder.variant {encoder.variant!r}")
        return given

    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        from .encoders import QwenImageConditioner

        return QwenImageConditioner.from_pretrained(folder, text_encoder_dtype=dtype, vae_dtype=dtype, device=device)

    def conditioner_from_fingerprint(self, fingerprint: Mapping[str, Any]) -> Any:
        from .encoders import QwenImageConditioner

        return QwenImageConditioner.from_pretrained(
            fingerprint["model_path"],
            variant=fingerprint["variant"],
            max_sequence_length=fingerprint["max_sequence_length"],
            negative_prompt=fingerprint["negative_prompt"],
            text_encoder_dtype=_DTYPES[fingerprint["text_encoder_dtype"]],
            vae_dtype=_DTYPES[fingerprint["vae_dtype"]],
        )

    def encoder_fingerprint(self, encoder: Any) -> dict[str, Any]:
        from pathlib import Path

        return {
            "model_path": str(Path(encoder.model_path).resolve()),
            "variant": encoder.variant,
            "max_sequence_length": encoder.max_sequence_length,
            "negative_prompt": encoder.resolved_negative_prompt,
            "text_encoder_dtype": encoder.text_encoder_dtype,
            "vae_dtype": encoder.vae_dtype,
        }

    def encoder_takes_reference(self, encoder: Any) -> bool:
        return encoder.variant != "t2i"

    # ----------------------------------------------------------------------------------- checks
    def check_model_files(self, config: QwenImageBackboneConfig) -> None:
        try:
            config.transformer_settings()
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key '", "config key 'model.", 1)) from e

    def check_data_shapes(self, config: QwenImageBackboneConfig, shapes: DataShapes, *, read_files: bool) -> None:
        if config.transformer is None and not read_files:
            return
        model = config.transformer_settings()
        want = config.latent_channels_of(model)
        where = "model.transformer" if config.transformer is not None else f"model.pretrained ({config.pretrained})"
        if shapes.latent_channels != want:
            raise ConfigError(
                f"config key '{shapes.channels_key}' gives {shapes.latent_channels} latent channels but {where} takes "
                f"{want} (in_channels {model['in_channels']} / patch_size {model['patch_size']}**2)"
            )
        patch = int(model["patch_size"])
        if shapes.height % patch or shapes.width % patch:
            raise ConfigError(f"config key '{shapes.size_key}': latents of {shapes.height}x{shapes.width} do not split "
                              f"into {patch}x{patch} patches ({where}.patch_size)")
        text_dim = int(shapes.layout["embed_dim"])
        if text_dim != int(model["joint_attention_dim"]):
            raise ConfigError(f"config key '{shapes.layout_key}' gives text embeddings of width {text_dim} but {where} "
                              f"takes {model['joint_attention_dim']} (joint_attention_dim)")

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: QwenImageBackboneConfig) -> list[str]:
        from .lora import lora_config

        return sorted(lora_config(config.lora, dropout=0.0).target_modules)

    # ------------------------------------------------------------------------------------ memory
    def memory_inventory(self, config: QwenImageBackboneConfig) -> MemoryInventory:
        from .memory import ACTIVATIONS, transformer_architecture, transformer_param_sizes

        arch, source = transformer_architecture(config)
        return MemoryInventory(
            sizes_by_module=transformer_param_sizes(arch, twin_embedder=config.twin_embedder),
            block_prefix="transformer_blocks.",
            width=int(arch["attention_head_dim"]) * int(arch["num_attention_heads"]),
            patch_size=int(arch.get("patch_size", 2)),
            architecture_source=source,
            activations=ACTIVATIONS,
        )

    def encoder_params(self) -> dict[str, int]:
        from .memory import encoder_params

        return encoder_params()

    def latent_factor(self) -> int:
        return 8

    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        if fingerprint is None:
            from .encoders import MAX_SEQUENCE_LENGTH

            return MAX_SEQUENCE_LENGTH
        return int(fingerprint["max_sequence_length"])

    # ------------------------------------------------------------------------------------ export
    def export_keys(self, transformer_config: Mapping[str, Any], config: QwenImageBackboneConfig) -> set[str]:
        from .export import plain_transformer

        return set(plain_transformer(transformer_config, config).state_dict())

    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        from .export import write_transformer

        write_transformer(state, transformer_config, config, folder, weights=weights, merge_lora=merge_lora)
