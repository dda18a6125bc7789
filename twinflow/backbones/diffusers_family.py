"""What the diffusers-transformer families (Qwen-Image, SD3.5, Z-Image) do alike behind the seam.

:class:`DiffusersFamilySpec` is their :class:`~twinflow.backbones.registry.BackboneSpec` base: each
family's modules sit in one package (``encoders``, ``tiny``, ``memory``, ``export``, imported on use so
that loading a config stays light), and the class attributes name what differs. The helpers below are
the memory inventory's and the builders' common steps. Nothing heavy is imported at the top.
"""
from __future__ import annotations

import importlib
import json
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import torch

from twinflow.backbones.registry import BackboneSpec, DataShapes, MemoryInventory
from twinflow.utils.partitioned import is_partitioned
from twinflow.utils.typed_config import ConfigError


class DiffusersFamilySpec(BackboneSpec):
    """A family whose package holds ``encoders`` (``EncoderConfig`` and the conditioner class
    :attr:`conditioner_name`), ``tiny``, ``memory`` and ``export``; see the class attributes."""

    conditioner_name: str = ""
    """The conditioner class in the family's ``encoders`` module."""
    fingerprint_fields: Mapping[str, str] = {
        "max_sequence_length": "max_sequence_length",
        "negative_prompt": "negative_prompt",
        "text_encoder_dtype": "text_encoder_dtype",
        "vae_dtype": "vae_dtype",
    }
    """Cache fingerprint key -> ``encoder`` section attribute (``model_path`` comes first, made absolute)."""
    patch_setting: str = "patch_size"
    """The transformer config key of the patch size (named in errors)."""
    text_width_setting: str = "joint_attention_dim"
    """The transformer config key of the text embedding width."""
    block_prefix: str = "transformer_blocks."
    """Parameter name prefix of the repeated transformer blocks (the memory plan's unit)."""
    time_embed_2: str = "time_text_embed_2"
    """The second time embedder's module name (named in errors)."""

    def family_module(self, name: str) -> ModuleType:
        """The family package's module ``name``, imported now (heavy ones import diffusers)."""
        return importlib.import_module(f"{type(self).__module__.rpartition('.')[0]}.{name}")

    @property
    def encoder_config_type(self) -> type:  # type: ignore[override]
        return self.family_module("encoders").EncoderConfig

    def conditioner_class(self) -> Any:
        return getattr(self.family_module("encoders"), self.conditioner_name)

    # ------------------------------------------------------------------------------------- build
    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        return self.builder()(self.config_type(pretrained=folder, dtype=dtype), device)

    def tiny_config(self) -> dict[str, Any]:
        tiny = self.family_module("tiny")
        return {"family": self.family, "transformer": tiny.tiny_transformer_config(), "dtype": "float32"}

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_config(self, encoder: Any, device: Any, given: Any = None) -> Any:
        return self.conditioner_class().from_config(encoder, device=device) if given is None else given

    def conditioner_from_fingerprint(self, fingerprint: Mapping[str, Any]) -> Any:
        keys = self.fingerprint_fields
        return self.conditioner_class().from_pretrained(fingerprint["model_path"], **{k: fingerprint[k] for k in keys})

    def encoder_fingerprint(self, encoder: Any) -> dict[str, Any]:
        from pathlib import Path

        fields = {key: getattr(encoder, attr) for key, attr in self.fingerprint_fields.items()}
        return {"model_path": str(Path(encoder.model_path).resolve()), **fields}

    def encoder_takes_reference(self, encoder: Any) -> bool:
        return False

    # ----------------------------------------------------------------------------------- checks
    def check_lora_time_embed_2(self, config: Any) -> None:
        """What the trainer's build cannot do, refused before any rank starts: it builds under
        ``deepspeed.zero.Init``, where ``add_lora`` cannot copy the second time embedder per adapter
        (``lora.train_time_embed_2: full``)."""
        if config.lora.enabled and getattr(config.lora, "train_time_embed_2", None) == "full":
            raise ConfigError(f"config key 'model.lora.train_time_embed_2': 'full' copies {self.time_embed_2} per "
                              "adapter, which cannot be done on the ZeRO-3 partitioned parameters the trainer builds; "
                              "set 'lora' (LoRA on its timestep MLP, with an EMA adapter like the rest) or 'frozen'")

    def check_model_files(self, config: Any) -> None:
        self.check_lora_time_embed_2(config)
        try:
            config.transformer_settings()
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key '", "config key 'model.", 1)) from e

    def check_data_shapes(self, config: Any, shapes: DataShapes, *, read_files: bool) -> None:
        self.check_layout(shapes)
        if config.transformer is None and not read_files:
            return
        model = config.transformer_settings()
        where = "model.transformer" if config.transformer is not None else f"model.pretrained ({config.pretrained})"
        self.check_latent_channels(model, shapes, where)
        patch = self.patch_of(model)
        if shapes.height % patch or shapes.width % patch:
            raise ConfigError(f"config key '{shapes.size_key}': latents of {shapes.height}x{shapes.width} do not split "
                              f"into {patch}x{patch} patches ({where}.{self.patch_setting})")
        self.check_text_widths(model, shapes, where)

    def check_layout(self, shapes: DataShapes) -> None:
        """Checks of the cache layout alone (before the model's architecture is read)."""

    def patch_of(self, model: Mapping[str, Any]) -> int:
        return int(model[self.patch_setting])

    def check_latent_channels(self, model: Mapping[str, Any], shapes: DataShapes, where: str) -> None:
        if shapes.latent_channels != int(model["in_channels"]):
            raise ConfigError(f"config key '{shapes.channels_key}' gives {shapes.latent_channels} latent channels but "
                              f"{where} takes {model['in_channels']} (in_channels)")

    def check_text_widths(self, model: Mapping[str, Any], shapes: DataShapes, where: str) -> None:
        text_dim, setting = int(shapes.layout["embed_dim"]), self.text_width_setting
        if text_dim != int(model[setting]):
            raise ConfigError(f"config key '{shapes.layout_key}' gives text embeddings of width {text_dim} but {where} "
                              f"takes {model[setting]} ({setting})")

    # ------------------------------------------------------------------------------------ memory
    def memory_inventory(self, config: Any) -> MemoryInventory:
        """An MMDiT's inventory: ``transformer_blocks.``, width heads x head dim (``memory`` module's
        architecture, parameter sizes and activation profile)."""
        memory = self.family_module("memory")
        arch, source = memory.transformer_architecture(config)
        return MemoryInventory(
            sizes_by_module=memory.transformer_param_sizes(arch, twin_embedder=config.twin_embedder),
            block_prefix=self.block_prefix,
            width=int(arch["attention_head_dim"]) * int(arch["num_attention_heads"]),
            patch_size=int(arch.get("patch_size", 2)),
            architecture_source=source,
            activations=memory.ACTIVATIONS,
        )

    def encoder_params(self) -> dict[str, int]:
        return self.family_module("memory").encoder_params()

    def latent_factor(self) -> int:
        return 8

    # ------------------------------------------------------------------------------------ export
    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        self.family_module("export").write_transformer(state, transformer_config, config, folder, weights=weights,
                                                       merge_lora=merge_lora)


def transformer_architecture(model: Any, resolve: Callable[[str], Any], published: Mapping[str, Any],
                             published_name: str, keys: Any,
                             defaults: Optional[Mapping[str, Any]] = None) -> tuple[dict[str, Any], str]:
    """The transformer architecture of the run and where it came from (no weights are read): the inline
    ``model.transformer``, the pretrained folder's ``config.json`` (its ``keys``), or, when that folder is
    not on this machine (``resolve`` raises), the ``published`` config. ``defaults`` (if given) fill what
    the first two omit."""
    base = dict(defaults or {})
    if model.transformer is not None:
        return {**base, **model.transformer}, "inline model.transformer config"
    try:
        folder = resolve(model.pretrained)
    except ConfigError:
        return dict(published), (
            f"published {published_name} config (model.pretrained {model.pretrained} is not on this machine)"
        )
    raw = json.loads((folder / "config.json").read_text())
    return {**base, **{k: v for k, v in raw.items() if k in keys}}, str(folder / "config.json")


def place_and_adapt(transformer: torch.nn.Module, config: Any, device: Any,
                    add_lora: Callable[[torch.nn.Module, Any], Any]) -> None:
    """A builder's last steps on the transformer: move it to ``device`` and the config's dtype unless
    ZeRO-3 placed (partitioned) it already, then add LoRA when the config enables it."""
    if not any(is_partitioned(p) for p in transformer.parameters()):
        # nn.Module.to: diffusers' override warns about an empty keep-in-fp32 list on every dtype cast.
        torch.nn.Module.to(transformer, device=device, dtype=config.torch_dtype)
    if config.lora.enabled:
        add_lora(transformer, config.lora)
