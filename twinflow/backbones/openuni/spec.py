"""OpenUni behind the backbone seam (:class:`twinflow.backbones.registry.BackboneSpec`).

Imported whenever a config is loaded, so only the light modules (config, condition) are imported at the
top; each method imports what it needs.

What differs from the diffusers families: the condition is the tokenized prompt
(:class:`~.condition.OpenUniPrompt`), because the frozen InternVL3 runs inside the backbone with the
learnable queries (its states depend on trained weights); the trained and exported network is SANA plus
the query head (:class:`~.backbone.OpenUniGenerator`), and the language model stays resident and frozen
beside it (see ``backbone.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from twinflow.backbones.diffusers_family import DiffusersFamilySpec
from twinflow.backbones.dual_time import check_fused_lora
from twinflow.backbones.registry import CacheSchema, DataShapes, MemoryInventory, register_backbone
from twinflow.kernels.dual_time_rule import SANA, CombineRule
from twinflow.utils.typed_config import ConfigError

from .condition import OpenUniPrompt
from .config import FAMILY, OpenUniBackboneConfig
from .lora import TIME_EMBED_2



class OpenUniCacheSchema(CacheSchema):
    """The prompt's token ids, stored ragged (``input_ids`` + ``offsets``, valid tokens only, so no mask);
    the negative prompt's once. No LLM states: they depend on the trained queries."""

    format = "twinflow-openuni-cache"
    ragged = {"input_ids": "offsets"}

    def rows(self, cond: OpenUniPrompt) -> list[dict[str, Any]]:
        return [{"input_ids": cond.input_ids[row][cond.mask[row]]} for row in range(len(cond))]

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> OpenUniPrompt:
        if any("input_ids" not in r for r in rows):
            raise ValueError("OpenUni conditions are prompt token ids: train from a cache built by the openuni "
                             "encoder (python -m twinflow.data.precompute), not from text embeddings")
        return OpenUniPrompt.cat([
            OpenUniPrompt(r["input_ids"][None].long(), torch.ones(1, r["input_ids"].shape[0], dtype=torch.bool))
            for r in rows
        ])

    def layout(self, cond: OpenUniPrompt) -> dict[str, Any]:
        return {"prompt_tokens": True, "has_ref": False}

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        return False


@register_backbone(FAMILY)
class OpenUniSpec(DiffusersFamilySpec):
    config_type = OpenUniBackboneConfig
    condition_type = OpenUniPrompt
    cache_schema = OpenUniCacheSchema()
    transformer_class_names = ("TwinFlowSanaTransformer", "SanaTransformer2DModel")
    """An OpenUni folder's ``transformer/`` (a converted or exported one; a folder without ``query_head/`` is then
    refused by name when it is built)."""
    conditioner_name = "OpenUniPromptConditioner"
    fingerprint_fields = {"max_sequence_length": "max_sequence_length", "negative_prompt": "negative_prompt",
                          "vae_dtype": "vae_dtype"}
    time_embed_2 = TIME_EMBED_2

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[OpenUniBackboneConfig, Any], Any]:
        from . import build  # imported before the trainer enters zero.Init (see .build)

        return build.build_openuni_backbone

    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        """An exported (or converted) OpenUni folder; LoRA exports need ``--merge-lora`` (``transformer/``)."""
        twin = bool(json.loads((Path(folder) / "transformer" / "config.json").read_text()).get("twin_embedder", True)) \
            if (Path(folder) / "transformer" / "config.json").is_file() else True
        config = OpenUniBackboneConfig(pretrained=folder, dtype=dtype, twin_embedder=twin, train_query_head=False)
        return self.builder()(config, device).eval()

    def dual_time_rule(self, config: OpenUniBackboneConfig) -> Optional[CombineRule]:
        """``out_1(T) + out_2(TT) (T - TT) / 1000`` on both outputs of SANA's ``AdaLayerNormSingle`` (the
        kernel's ``SANA``); without the twin embedder, None (``E1(T - TT/2)``)."""
        return SANA if config.twin_embedder else None

    def tiny_config(self) -> dict[str, Any]:
        """Writes the tiny OpenUni folder (``tiny_encoders.save_tiny_model_folder``) to a fresh temporary
        folder: the frozen LLM always comes from files."""
        import tempfile

        from .tiny_encoders import save_tiny_model_folder

        folder = save_tiny_model_folder(tempfile.mkdtemp(prefix="twinflow-tiny-openuni-"))
        return {"family": FAMILY, "pretrained": str(folder), "dtype": "float32"}

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        return self.conditioner_class().from_pretrained(folder, device=device, vae_dtype=name)

    # ----------------------------------------------------------------------------------- checks
    def check_model_files(self, config: OpenUniBackboneConfig) -> None:
        from .transformer import FUSED_TIME_LINEARS

        self.check_lora_time_embed_2(config)
        check_fused_lora(self, config, tuple(FUSED_TIME_LINEARS))
        config.transformer_settings()
        config.query_head_settings()
        config.llm_folder()

    def check_data_shapes(self, config: OpenUniBackboneConfig, shapes: DataShapes, *, read_files: bool) -> None:
        if not shapes.layout.get("prompt_tokens"):
            raise ConfigError(f"config key '{shapes.layout_key}': OpenUni trains from prompt token ids, which only a "
                              "cache built by the openuni encoder holds (data.cache_dir with python -m "
                              "twinflow.data.precompute), not synthetic_data")
        if not read_files:
            return
        model = config.transformer_settings()
        where = f"model.pretrained ({config.pretrained})"
        self.check_latent_channels(model, shapes, where)
        patch = self.patch_of(model)
        if shapes.height % patch or shapes.width % patch:
            raise ConfigError(f"config key '{shapes.size_key}': latents of {shapes.height}x{shapes.width} do not split "
                              f"into {patch}x{patch} patches ({where}.patch_size)")

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: OpenUniBackboneConfig) -> list[str]:
        from .lora import lora_config

        return sorted(lora_config(config.lora).target_modules)

    # ------------------------------------------------------------------------------------ memory
    def memory_inventory(self, config: OpenUniBackboneConfig) -> MemoryInventory:
        return self.family_module("memory").memory_inventory(config)

    def encoder_params(self) -> dict[str, int]:
        """The DC-AE (the LLM is part of the backbone: :attr:`MemoryInventory.resident_frozen`)."""
        return self.family_module("memory").encoder_params()

    def latent_factor(self) -> int:
        return 32

    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        """0: SANA's blocks carry image tokens only; the 256 queries it cross-attends to are inside the
        measured bytes per image token (``memory.ACTIVATIONS``)."""
        return 0

    # ------------------------------------------------------------------------------------ export
    def export_keys(self, transformer_config: Mapping[str, Any], config: OpenUniBackboneConfig) -> set[str]:
        from . import export

        return export.export_keys(transformer_config, config)

    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        from . import export

        export.write_openuni(state, transformer_config, config, Path(folder), weights=weights, merge_lora=merge_lora)
