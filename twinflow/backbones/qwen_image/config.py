"""Configuration of the Qwen-Image backbone and its builder.

Every step the reference made users do by editing code is a key here:

* "use the original transformer instead of the wrapper" (its LoRA recipes): ``twin_embedder: false``;
* "switch to LoRA training, add LoRA like the SD3 script": ``lora.enabled: true`` (+ rank, alpha, ...);
* "no EMA for Qwen-Image because of memory; modify to LoRA": ``lora.ema_adapter: true`` (an EMA adapter
  beside the trainable one; the method's ``ema_decay_rate`` chooses the teacher);
* "change QwenImage to QwenImageEdit": ``edit: true`` (reference latents travel in
  ``QwenCondition.ref_latents``).

The builder (:func:`twinflow.backbones.qwen_image.build.build_qwen_image_backbone`) lives apart so that
reading a config imports neither diffusers nor peft; imports run one way: ``build`` and ``lora`` import
this module, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from twinflow.utils.typed_config import ConfigError

FAMILY = "qwen_image"
"""This backbone's ``model.family`` (the registry's default family)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
"""Every attention projection of both streams and both streams' MLPs (peft suffix patterns)."""

TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": False,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}
"""The keys an inline ``transformer`` config may set, with the transformer's defaults, so that a
misspelled key is refused when the config is loaded (without importing diffusers). A test keeps this
equal to ``TwinFlowQwenImageTransformer.__init__``'s signature (less the top-level ``twin_embedder`` and
``kernels``)."""


@dataclass
class LoraSettings:
    """LoRA through peft: a trainable adapter ``default`` and (``ema_adapter``) its EMA ``ema``.

    ``train_time_embed_2`` says how the second time embedder learns when ``twin_embedder`` is on:
    ``full`` (default: it is a fresh copy of E1 and small, ~D*(D+256) weights, so it is trained in full
    as a per-adapter copy, which gives it an EMA copy too), ``lora`` (LoRA on its two linears), or
    ``frozen``. Leave it unset without a twin embedder.
    """

    enabled: bool = False
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_time_embed_2: Literal["full", "lora", "frozen"] | None = None
    ema_adapter: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"config key 'lora.rank' must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"config key 'lora.alpha' must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'lora.dropout' must lie in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("config key 'lora.target_modules' must name at least one module pattern")


@dataclass
class ModelSource:
    """The ``model`` section's first keys, which every diffusers family has: ``family``, where the
    transformer comes from (exactly one of ``pretrained`` and ``transformer``; see
    :func:`check_model_source`) and the compute ``dtype``. A family's section subclasses it, setting
    ``family``'s default (the field keeps its place) and adding its own keys after these."""

    family: str = ""
    pretrained: str | None = None
    transformer: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class QwenImageBackboneConfig(ModelSource):
    """Where the transformer comes from and how it runs.

    Exactly one of ``pretrained`` (a local diffusers folder: a pipeline root with ``transformer/`` or a
    transformer folder; loaded offline) and ``transformer`` (an inline transformer config, e.g.
    :func:`~.tiny.tiny_transformer_config`, randomly initialised) must be set.
    """

    family: str = FAMILY
    twin_embedder: bool = True
    kernels: Literal["eager", "triton"] = "eager"
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False
    edit: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        check_model_source(self, FAMILY)
        if self.transformer is not None:
            self._check_transformer_keys(self.transformer)
        if self.lora.train_time_embed_2 is None:
            self.lora.train_time_embed_2 = "full" if self.twin_embedder else "frozen"
        elif self.lora.train_time_embed_2 != "frozen" and not self.twin_embedder:
            raise ConfigError(
                f"config key 'lora.train_time_embed_2': {self.lora.train_time_embed_2!r} needs twin_embedder: true "
                "(there is no time_text_embed_2 in single-embedder mode)"
            )

        if self.kernels == "triton" and self.lora.enabled and self.lora.train_time_embed_2 == "lora":
            raise ConfigError(
                "config keys 'kernels: triton' and 'lora.train_time_embed_2: lora' conflict: the fused time "
                "embedding reads plain Linear weights; use train_time_embed_2 'full' or 'frozen', or kernels 'eager'"
            )

    @staticmethod
    def _check_transformer_keys(transformer: dict[str, Any]) -> None:
        import difflib

        for key in sorted(transformer):
            if key in ("twin_embedder", "kernels"):
                raise ConfigError(f"config key 'transformer.{key}' is a top-level backbone key: set '{key}' instead")
            if key not in TRANSFORMER_DEFAULTS:
                close = difflib.get_close_matches(key, TRANSFORMER_DEFAULTS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {sorted(TRANSFORMER_DEFAULTS)}"
                raise ConfigError(f"unknown config key 'transformer.{key}'{hint}")
        for key, value in transformer.items():
            default = TRANSFORMER_DEFAULTS[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"config key 'transformer.{key}': expected true/false, got {value!r}")
            elif isinstance(default, tuple):
                if not isinstance(value, (list, tuple)) or len(value) != len(default) or not all(
                        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                    raise ConfigError(f"config key 'transformer.{key}' must be {len(default)} integers >= 1, got {value!r}")
            elif not (value is None and key == "out_channels") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"config key 'transformer.{key}' must be an integer >= 1, got {value!r}")

    def transformer_settings(self) -> dict[str, Any]:
        """The transformer's settings: the inline ``transformer`` over the defaults, or the pretrained
        folder's ``config.json`` (reads that file; :class:`ConfigError` naming it when it is unusable)."""
        return transformer_settings(TRANSFORMER_DEFAULTS, self.transformer, self.pretrained)

    @staticmethod
    def latent_channels_of(settings: dict[str, Any]) -> int:
        """Latent channels C the transformer takes: ``in_channels = C * patch_size**2`` (2x2 packing)."""
        return int(settings["in_channels"]) // int(settings["patch_size"]) ** 2


def transformer_settings(defaults: dict[str, Any], inline: dict[str, Any] | None, pretrained: str | None) -> dict[str, Any]:
    """``inline`` over ``defaults``, or the ``defaults`` keys of ``pretrained``'s transformer ``config.json``
    over them (:class:`ConfigError` naming the file when it is unusable). Shared by the diffusers backbones."""
    if inline is not None:
        return {**defaults, **inline}
    import json

    file = resolve_pretrained_dir(pretrained) / "config.json"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'pretrained': cannot read {file}: {e}") from e
    return {**defaults, **{k: v for k, v in saved.items() if k in defaults}}


def check_model_source(section: Any, family: str) -> None:
    """A ``model`` section of ``family`` names exactly one of ``pretrained`` and ``transformer``."""
    if section.family != family:
        raise ConfigError(f"config key 'family' is {section.family!r}, but this is the {family!r} section")
    if (section.pretrained is None) == (section.transformer is None):
        raise ConfigError("exactly one of config keys 'pretrained' and 'transformer' must be set")


def resolve_pretrained_dir(path: str) -> Path:
    """The folder holding the transformer's ``config.json``: ``path/transformer`` or ``path`` itself."""
    root = Path(path)
    for candidate in (root / "transformer", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(
        f"config key 'pretrained': {path} holds no transformer config.json (looked in {root / 'transformer'} and {root})"
    )
