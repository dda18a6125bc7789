"""Configuration of the SD3.5 backbone (the ``model`` section with ``family: sd35``).

Keys as Qwen-Image's where they mean the same (``pretrained`` / ``transformer``, ``dtype``,
``twin_embedder``, ``gradient_checkpointing``, ``lora``); the LoRA settings are Qwen-Image's with the
reference's SD3.5 target list as default. There is no ``attention_backend`` (diffusers' SD3 attention
processor picks PyTorch's SDPA kernel) and no edit variant.

``kernels: triton`` runs the fused dual-time embedding under its ``SD35`` rule (the trainer writes the
top-level ``kernels`` into ``model.kernels``; ``auto`` is triton on CUDA). The kernel reads plain
Linear weights, so LoRA on the timestep MLPs (the default targets) needs ``kernels: eager``.

With ``twin_embedder`` and LoRA, ``lora.train_time_embed_2`` alone decides how ``time_text_embed_2``
learns (the bare timestep-MLP target patterns are anchored to the first embedder). The trainer builds
under ZeRO-3, where ``full`` cannot be done: the spec's ``check_model_files`` refuses it.

Imports stay light (no diffusers): this module is imported whenever a config is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from twinflow.utils.typed_config import ConfigError

from ..qwen_image.config import (  # noqa: F401  (resolve_pretrained_dir: this family's builder and memory use it)
    LoraSettings,
    ModelSource,
    check_model_source,
    resolve_pretrained_dir,
    transformer_settings,
)
from .lora import LORA_TARGET_MODULES, TIME_EMBED_2

ANCHORED_TARGETS = {f"timestep_embedder.linear_{i}": f"time_text_embed.timestep_embedder.linear_{i}" for i in (1, 2)}
"""Bare LoRA patterns rewritten (twin embedder, LoRA on) so that they name the first embedder only."""
TIME_EMBED_2_LINEARS = tuple(f"{TIME_EMBED_2}.{part}.linear_{i}" for part in ("timestep_embedder", "text_embedder")
                             for i in (1, 2))
"""``time_text_embed_2``'s linears (timestep MLP and pooled-text projection)."""

FAMILY = "sd35"

TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
"""SD3.5-Medium's published transformer config (``transformer/config.json`` of
stabilityai/stable-diffusion-3.5-medium): the keys an inline ``transformer`` may set, and its values
for the memory plan when the pretrained folder is not on this machine."""


@dataclass
class SD35LoraSettings(LoraSettings):
    """Qwen-Image's LoRA settings (see there) with the reference's SD3.5 targets as default."""

    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))


@dataclass
class SD35BackboneConfig(ModelSource):
    """Where the SD3.5 transformer comes from and how it runs: exactly one of ``pretrained`` (a local
    diffusers folder, pipeline root or ``transformer/``) and ``transformer`` (inline config)."""

    family: str = FAMILY
    twin_embedder: bool = True
    kernels: Literal["eager", "triton"] = "eager"
    gradient_checkpointing: bool = False
    edit: bool = False
    lora: SD35LoraSettings = field(default_factory=SD35LoraSettings)

    def __post_init__(self) -> None:
        check_model_source(self, FAMILY)
        if self.edit:
            raise ConfigError("config key 'edit': SD3.5 has no edit variant")
        if self.transformer is not None:
            unknown = sorted(set(self.transformer) - set(TRANSFORMER_DEFAULTS))
            if unknown:
                raise ConfigError(f"unknown config keys {[f'transformer.{k}' for k in unknown]}; "
                                  f"valid keys: {sorted(TRANSFORMER_DEFAULTS)}")
        if self.lora.train_time_embed_2 is None:
            self.lora.train_time_embed_2 = "full" if self.twin_embedder else "frozen"
        elif self.lora.train_time_embed_2 != "frozen" and not self.twin_embedder:
            raise ConfigError(f"config key 'lora.train_time_embed_2': {self.lora.train_time_embed_2!r} needs "
                              "twin_embedder: true (there is no time_text_embed_2 in single-embedder mode)")
        if self.twin_embedder and self.lora.enabled:
            self._leave_time_embed_2_to_its_setting()

    def _leave_time_embed_2_to_its_setting(self) -> None:
        """With the twin embedder, ``time_text_embed_2`` learns as ``lora.train_time_embed_2`` says, not
        through ``lora.target_modules``: the reference's bare ``timestep_embedder.linear_*`` patterns (the
        default, written for one embedder) are anchored to ``time_text_embed`` (peft matches suffixes, so
        they would adapt E2's timestep MLP too, even when ``frozen``). A remaining pattern that still
        matches one of E2's linears is refused when E2 is ``frozen``."""
        self.lora.target_modules = [ANCHORED_TARGETS.get(t, t) for t in self.lora.target_modules]
        if self.lora.train_time_embed_2 != "frozen":
            return  # 'lora' adds E2's timestep linears itself; 'full' trains E2 whole (peft adapts nothing inside)
        hits = sorted({t for t in self.lora.target_modules for name in TIME_EMBED_2_LINEARS
                       if name == t or name.endswith("." + t)})
        if hits:
            raise ConfigError(f"config keys 'lora.target_modules' and 'lora.train_time_embed_2: frozen' conflict: "
                              f"{hits} also match linears of {TIME_EMBED_2}; name the first embedder's modules "
                              f"(e.g. 'time_text_embed.timestep_embedder.linear_1') or set train_time_embed_2 'lora'")

    def transformer_settings(self) -> dict[str, Any]:
        """The inline ``transformer`` over the defaults, or the pretrained folder's ``config.json``."""
        return transformer_settings(TRANSFORMER_DEFAULTS, self.transformer, self.pretrained)

