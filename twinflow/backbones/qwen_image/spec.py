"""Qwen-Image / Qwen-Image-Edit behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so it imports only the light modules (config, condition) at the
top; each method imports what it needs. What the diffusers families share is in
:class:`~twinflow.backbones.diffusers_family.DiffusersFamilySpec`; here is what is Qwen-Image's.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from twinflow.backbones.diffusers_family import DiffusersFamilySpec
from twinflow.backbones.registry import CacheSchema, DataShapes, register_backbone
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
class QwenImageSpec(DiffusersFamilySpec):
    config_type = QwenImageBackboneConfig
    condition_type = QwenCondition
    cache_schema = QwenCacheSchema()
    conditioner_name = "QwenImageConditioner"
    fingerprint_fields = {
        "variant": "variant",
        "max_sequence_length": "max_sequence_length",
        "negative_prompt": "resolved_negative_prompt",
        "text_encoder_dtype": "text_encoder_dtype",
        "vae_dtype": "vae_dtype",
    }

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[QwenImageBackboneConfig, Any], Any]:
        from .build import build_qwen_image_backbone

        return build_qwen_image_backbone

    def dual_time_rule(self, config: QwenImageBackboneConfig) -> Optional[CombineRule]:
        """``E1(t) + E2(tt) (t - tt)`` (the kernel's ``QWEN_IMAGE``); without the twin embedder, None
        (``E1(t - tt/2)``, no second term)."""
        return QWEN_IMAGE if config.twin_embedder else None

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_config(self, encoder: Any, device: Any, given: Any = None) -> Any:
        if given is not None and given.variant != encoder.variant:
            raise ValueError(f"conditioner variant {given.variant!r} != encoder.variant {encoder.variant!r}")
        return super().conditioner_from_config(encoder, device, given)

    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        return self.conditioner_class().from_pretrained(folder, text_encoder_dtype=dtype, vae_dtype=dtype,
                                                        device=device)

    def conditioner_from_fingerprint(self, fingerprint: Mapping[str, Any]) -> Any:
        """As the base, with the dtypes' names turned into torch dtypes (this conditioner takes those)."""
        dtypes = {k: _DTYPES[fingerprint[k]] for k in ("text_encoder_dtype", "vae_dtype")}
        return super().conditioner_from_fingerprint({**fingerprint, **dtypes})

    def encoder_takes_reference(self, encoder: Any) -> bool:
        return encoder.variant != "t2i"

    # ----------------------------------------------------------------------------------- checks
    def check_latent_channels(self, model: Mapping[str, Any], shapes: DataShapes, where: str) -> None:
        """The latents are packed: ``in_channels`` counts a patch's channels."""
        want = QwenImageBackboneConfig.latent_channels_of(model)
        if shapes.latent_channels != want:
            raise ConfigError(
                f"config key '{shapes.channels_key}' gives {shapes.latent_channels} latent channels but {where} takes "
                f"{want} (in_channels {model['in_channels']} / patch_size {model['patch_size']}**2)"
            )

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: QwenImageBackboneConfig) -> list[str]:
        from .lora import lora_config

        return sorted(lora_config(config.lora, dropout=0.0).target_modules)

    # ------------------------------------------------------------------------------------ memory
    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        if fingerprint is None:
            from .encoders import MAX_SEQUENCE_LENGTH

            return MAX_SEQUENCE_LENGTH
        return int(fingerprint["max_sequence_length"])

    # ------------------------------------------------------------------------------------ export
    def export_keys(self, transformer_config: Mapping[str, Any], config: QwenImageBackboneConfig) -> set[str]:
        from .export import plain_transformer

        return set(plain_transformer(transformer_config, config).state_dict())
