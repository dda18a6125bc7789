"""The backbone seam: one registry through which the trainer, the data cache, the memory plan, export and
``twinflow sample`` reach a backbone family (see DESIGN.md, "the backbone seam").

A family is a folder ``twinflow/backbones/<family>/`` whose package registers a :class:`BackboneSpec`
with :func:`register_backbone`. The config key ``model.family`` selects it (default
:data:`DEFAULT_FAMILY`, so configs written before families existed resolve as they did). Code outside
``twinflow/backbones/`` asks this module for the spec and never imports a family's modules; a test
(``tests/backbones/test_backbone_seam.py``) keeps it so.

Families are found by name: ``backbone_spec("x")`` imports ``twinflow.backbones.x.spec``, the module
that registers it (a folder without one is not a family yet). That import must stay light (no
diffusers, no peft): it happens whenever a config is loaded. Heavy imports belong in the spec's methods.

A family's dual-time rule is the fused kernel's own description, :class:`CombineRule`
(``twinflow.kernels.dual_time_rule``, plain values): one description of the rule, which the kernel
compiles and the spec reports.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from twinflow.kernels.dual_time_rule import CombineRule
from twinflow.utils.typed_config import ConfigError

DEFAULT_FAMILY = "qwen_image"
"""The family of a ``model`` section without ``family``: every config that predates the key."""


@dataclass(frozen=True)
class ActivationProfile:
    """What one transformer block keeps for backward, per token and row (memory plan).

    ``saved_bytes_per_width * D + saved_bytes_constant`` bytes are saved by a block (measured, see
    ``measured_on``); the ``*_widths`` are estimates in D-wide bf16 tensors per token: the peak of one
    block's backward, of one block's forward without grad, and the layers outside the blocks.
    """

    saved_bytes_per_width: float
    saved_bytes_constant: int
    backward_transient_widths: int
    no_grad_block_widths: int
    non_block_widths: int
    measured_on: str


@dataclass(frozen=True)
class FrozenPassActivations:
    """What a frozen model that gradients pass through keeps for backward, per row of the main forward
    (OpenUni's language model when the queries train): ``layers`` layers of width ``width`` over ``tokens``
    tokens a row, each saving ``saved_widths_per_layer`` width-wide bf16 tensors per token (an estimate);
    with gradient checkpointing only each layer's input and one recomputed layer. ``tokens_source`` says
    where the token count comes from."""

    label: str
    layers: int
    width: int
    tokens: int
    saved_widths_per_layer: float
    tokens_source: str


@dataclass(frozen=True)
class MemoryInventory:
    """A backbone's parameters and activation geometry for the memory plan.

    ``sizes_by_module``: ``{module name: numels of the parameters it owns directly}`` (exact, built on
    the ``meta`` device); ``block_prefix`` names the repeated blocks; ``width`` is the hidden width D;
    ``patch_size`` the latent patch side; ``architecture_source`` says where the architecture came from;
    ``resident_frozen``: frozen models the backbone runs on every forward, held whole on every rank in
    the compute precision (name -> parameter count; OpenUni's language model); ``frozen_pass``: the
    activations such a model keeps when gradients flow through it (None: none do).
    """

    sizes_by_module: Mapping[str, Sequence[int]]
    block_prefix: str
    width: int
    patch_size: int
    architecture_source: str
    activations: ActivationProfile
    resident_frozen: Mapping[str, int] = field(default_factory=dict)
    frozen_pass: Optional[FrozenPassActivations] = None


@dataclass(frozen=True)
class DataShapes:
    """The shapes training data gives a backbone, and the config keys they come from (for messages).

    ``layout`` is what the cache schema recorded about the conditions (for a cache, its manifest; for
    synthetic data the same keys), e.g. ``{"embed_dim": 3584}``.
    """

    latent_channels: int
    height: int
    width: int
    layout: Mapping[str, Any]
    channels_key: str
    size_key: str
    layout_key: str


def param_sizes_by_module(model: Any) -> dict[str, tuple[int, ...]]:
    """``{module name: numels of the parameters it owns directly}`` in registration order (works on
    the ``meta`` device; shared parameters are counted once, at their first owner)."""
    seen: set[int] = set()
    out: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        sizes = []
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                sizes.append(p.numel())
        if sizes:
            out[name] = tuple(sizes)
    return out


class CacheSchema:
    """How a family's conditions are stored in the latent/text cache (``twinflow.data.cache``).

    A condition row becomes a dict of tensors (its *fields*). Fields named in ``ragged`` have a
    variable first dimension and are stored concatenated with an offsets tensor (the mapped name);
    the others are stacked. Fields in ``shared_with_uncond`` are the same for a row's conditional and
    unconditional condition and are stored once. ``format`` names the cache format in the manifest.
    """

    format: str = ""
    ragged: Mapping[str, str] = {}
    shared_with_uncond: tuple[str, ...] = ()

    def rows(self, cond: Any) -> list[dict[str, Any]]:
        """The fields of every row of a batched condition (valid tokens only, no padding)."""
        raise NotImplementedError

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        """A batched condition from row fields (the inverse of :meth:`rows`, padding as needed)."""
        raise NotImplementedError

    def layout(self, cond: Any) -> dict[str, Any]:
        """What the manifest records about a batch's conditions (checked equal across batches)."""
        raise NotImplementedError

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        """Whether conditions of this layout carry a reference image (edit)."""
        raise NotImplementedError


class BackboneSpec:
    """What a backbone family provides; the authoritative list (README's layout section summarises it).

    Class attributes: ``family`` (the ``model.family`` value), ``config_type`` (the strict dataclass of
    the ``model`` section; it has a ``family`` field and the attributes ``dtype``, ``torch_dtype``,
    ``edit``, ``kernels``, ``gradient_checkpointing`` and ``lora.enabled`` that the trainer reads),
    ``encoder_config_type`` (the ``encoder`` section the precompute reads), ``condition_type`` (indexable
    by rows with ``index(idx)``, joined with the classmethod ``cat(conds)``, moved with ``to(...)``;
    see ``twinflow.method.conditioning``) and ``cache_schema`` (a :class:`CacheSchema`).

    A *conditioner* (what the ``conditioner_*`` methods return) has ``encode_prompts(texts, ref_images=None)``,
    ``encode_pair(texts, ref_images)`` -> (cond, uncond), ``encode_unconditional(batch, ref_images=None)``,
    ``pixels_to_latents``, ``latents_to_pixels``, ``latent_channels``, ``vae_scale_factor`` and
    ``drop_text_encoder()`` (sampling keeps only the latent decoder).

    The built module (:meth:`builder`) is the TwinFlow callable ``F(x_t, t, tt, cond) -> velocity`` with
    signed times, and holds the exported network as ``.transformer`` (a diffusers model: ``config``,
    ``save_pretrained``); its parameter names start with ``transformer.``.
    """

    family: str = ""
    transformer_class_names: tuple[str, ...] = ()
    """``_class_name`` values of a diffusers ``config.json`` this family loads (a published folder without
    an export record is recognised by them; see :func:`family_of_model_folder`)."""
    config_type: type = object
    encoder_config_type: type = object
    condition_type: type = object
    cache_schema: CacheSchema = CacheSchema()

    # ------------------------------------------------------------------------------------- build
    def builder(self) -> Callable[[Any, Any], Any]:
        """``build(config, device)``: the module to train. Importing this method's dependencies happens
        here, so call it before entering ``deepspeed.zero.Init`` and call ``build`` inside it."""
        raise NotImplementedError

    def load_for_sampling(self, folder: str, dtype: str, device: Any) -> Any:
        """The module to sample from, loaded from an exported (or published) model folder."""
        raise NotImplementedError

    def dual_time_rule(self, config: Any) -> Optional[CombineRule]:
        """The dual-time combine rule of a model built from ``config`` (None: one embedder, no combine)."""
        raise NotImplementedError

    def tiny_config(self) -> dict[str, Any]:
        """A ``model`` section of a tiny local model (tests, demo): nothing is downloaded."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ conditioning
    def conditioner_from_config(self, encoder: Any, device: Any, given: Any = None) -> Any:
        """The encoders of the ``encoder`` section (``given``: already loaded ones, checked against it)."""
        raise NotImplementedError

    def conditioner_from_pretrained(self, folder: str, *, dtype: Any, device: Any) -> Any:
        """The encoders of a model folder (``twinflow sample --encoders``)."""
        raise NotImplementedError

    def conditioner_from_fingerprint(self, fingerprint: Mapping[str, Any]) -> Any:
        """The encoders a cache was built with, on the CPU, as its fingerprint records them."""
        raise NotImplementedError

    def encoder_fingerprint(self, encoder: Any) -> dict[str, Any]:
        """The ``encoder`` settings that change what a cache holds; includes ``model_path`` (the
        encoder folder, made absolute), which sampling reads back."""
        raise NotImplementedError

    def encoder_takes_reference(self, encoder: Any) -> bool:
        """Whether the ``encoder`` section encodes (prompt, reference image) pairs (edit)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- checks
    def check_data_shapes(self, config: Any, shapes: DataShapes, *, read_files: bool) -> None:
        """:class:`ConfigError` when data of ``shapes`` cannot feed the model of ``config``. Without
        ``read_files`` a model whose architecture is in files (a pretrained folder) is not checked."""
        raise NotImplementedError

    def check_model_files(self, config: Any) -> None:
        """:class:`ConfigError` (naming ``model.<key>``) when files the config names are unusable."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- LoRA
    def lora_targets(self, config: Any) -> list[str]:
        """The module name patterns LoRA adapts."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ memory
    def memory_inventory(self, config: Any) -> MemoryInventory:
        """The trained network's parameters and activation geometry (no weights are read)."""
        raise NotImplementedError

    def encoder_params(self) -> dict[str, int]:
        """Parameter counts of the conditioning models (name -> count), for a plan that keeps them resident."""
        raise NotImplementedError

    def latent_factor(self) -> int:
        """Pixels per latent side of the family's latent codec (the VAE's compression)."""
        raise NotImplementedError

    def max_text_tokens(self, fingerprint: Optional[Mapping[str, Any]]) -> int:
        """The longest text a batch is padded to: from a cache's fingerprint, or (None) the encoder's limit."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ export
    def export_keys(self, transformer_config: Mapping[str, Any], config: Any) -> set[str]:
        """The state-dict keys an export writes (to find the untrained ones a checkpoint lacks)."""
        raise NotImplementedError

    def write_export(self, state: dict[str, Any], transformer_config: Mapping[str, Any], config: Any, folder: Any,
                     *, weights: str, merge_lora: bool) -> None:
        """Write ``state`` (the exported network's full state dict) into ``folder`` in the family's
        published layout: a diffusers folder, or for LoRA its adapter (``weights`` says which) and,
        with ``merge_lora``, the merged model. Published TwinFlow checkpoints must load without remapping."""
        raise NotImplementedError


_SPECS: dict[str, BackboneSpec] = {}


def register_backbone(family: str) -> Callable[[type[BackboneSpec]], type[BackboneSpec]]:
    """Class decorator: register an instance of the decorated :class:`BackboneSpec` as ``family``."""

    def register(cls: type[BackboneSpec]) -> type[BackboneSpec]:
        spec = cls()
        spec.family = family
        _SPECS[family] = spec
        return cls

    return register


def unregister_backbone(family: str) -> None:
    """Remove a family (tests that register a toy one)."""
    _SPECS.pop(family, None)


def _family_packages() -> list[str]:
    """The folders under ``twinflow/backbones/`` with a ``spec.py``: a folder becomes a family when its
    spec registers it (a backbone still being built, without one, is not offered)."""
    import twinflow.backbones as package

    return [m.name for m in pkgutil.iter_modules(package.__path__)
            if m.ispkg and any((Path(root) / m.name / "spec.py").is_file() for root in package.__path__)]


def families() -> list[str]:
    """Every family: the folders under ``twinflow/backbones/`` that have a ``spec.py``, and any registered
    in this process."""
    return sorted(set(_family_packages()) | set(_SPECS))


def backbone_spec(family: Any = None, *, key: str = "model.family") -> BackboneSpec:
    """The spec of ``family``: a name, a ``model`` config (its ``family``), or None (the default)."""
    if family is not None and not isinstance(family, str):
        family = family.family
    name = DEFAULT_FAMILY if family is None else family
    if name not in _SPECS and name in _family_packages():
        importlib.import_module(f"twinflow.backbones.{name}.spec")
    if name not in _SPECS:
        raise ConfigError(f"config key '{key}': unknown backbone family {name!r}; known: {families()}")
    return _SPECS[name]


def _all_specs() -> Iterable[BackboneSpec]:
    for name in families():
        yield backbone_spec(name)


def spec_for_condition(cond: Any) -> BackboneSpec:
    """The spec whose condition type ``cond`` is."""
    for spec in _all_specs():
        if isinstance(cond, spec.condition_type):
            return spec
    raise TypeError(f"no backbone family has the condition type {type(cond).__name__}")


def family_of_model_folder(folder: Any) -> Optional[str]:
    """The family whose ``transformer_class_names`` name the ``_class_name`` of ``folder``'s transformer
    config (``transformer/config.json`` or ``config.json``); None when there is none or no family claims it."""
    import json

    for config in (Path(folder) / "transformer" / "config.json", Path(folder) / "config.json"):
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError, AttributeError):
                return None
            return next((s.family for s in _all_specs() if name in s.transformer_class_names), None)
    return None


def spec_for_cache_format(fmt: Any) -> Optional[BackboneSpec]:
    """The spec whose cache schema writes manifests of format ``fmt`` (None if no family does)."""
    return next((s for s in _all_specs() if s.cache_schema.format == fmt), None)


def cache_formats() -> list[str]:
    return [s.cache_schema.format for s in _all_specs()]


def spec_for_encoder_config(encoder: Any) -> BackboneSpec:
    """The spec whose ``encoder`` section ``encoder`` is."""
    for spec in _all_specs():
        if isinstance(encoder, spec.encoder_config_type):
            return spec
    raise TypeError(f"no backbone family has the encoder config type {type(encoder).__name__}")


class ModelConfig:
    """Annotation of the ``model`` section: the strict dataclass of the family that ``model.family``
    names (:mod:`twinflow.utils.typed_config` calls :meth:`select_config_type` to pick it)."""

    @staticmethod
    def select_config_type(value: Any, key: str) -> type:
        if isinstance(value, dict):
            return backbone_spec(value.get("family", DEFAULT_FAMILY), key=f"{key}.family").config_type
        spec = backbone_spec(getattr(value, "family", None), key=f"{key}.family")
        return spec.config_type
