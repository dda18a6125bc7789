"""The trainer's typed configuration: one strict dataclass tree loaded from YAML plus ``key=value`` overrides.

``load_train_config(path, overrides)`` is the only entry point the launcher uses. Loading is strict
(:mod:`twinflow.utils.typed_config`): an unknown or mistyped key raises :class:`ConfigError` naming its
full dotted path, e.g. ``optim.lr``. Cross-section checks (a micro batch too small for the method's batch
split, an EMA teacher combined with ZeRO-3 settings that would defeat it) run in
:meth:`TrainConfig.__post_init__`, so a bad run fails when it is configured, before any rank starts work.

Sections:

* ``model``: the backbone; ``model.family`` (default ``qwen_image``) picks its section's dataclass
  through :mod:`twinflow.backbones.registry`.
* ``method``: the TwinFlow objective (:class:`TwinFlowConfig`, with presets).
* ``data``: the data pipeline (:class:`DataConfig`; training reads its latent/text cache), or
  ``synthetic_data`` (:class:`SyntheticDataConfig`, tests and benchmarks): exactly one of the two.
* ``optim``: AdamW and the learning-rate schedule.
* ``train``: loop length, batch, seeding, checkpoint cadence, resume, non-finite step policy.
* ``deepspeed``: ZeRO stage, precision, offload, plus a raw ``extra`` dict merged into the DeepSpeed JSON.
* ``sampling``: the sample grids the run logger renders every ``train.sample_every`` steps.
* ``kernels``: ``triton`` | ``eager`` | ``auto``, the single switch propagated to the objective, the
  backbone and the EMA update.
* ``faults``: test hooks that make a run fail on purpose (all off by default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from twinflow.backbones.registry import DataShapes, ModelConfig, backbone_spec, spec_for_cache_format
from twinflow.data.config import DataConfig
from twinflow.method.config import TwinFlowConfig
from twinflow.method.groups import split_batch
from twinflow.sampling.config import SAMPLER_PRESETS
from twinflow.utils.typed_config import ConfigError, load_config, to_dict

from .data import SyntheticDataConfig, check_prompts_only_data

KernelChoice = Literal["triton", "eager", "auto"]


@dataclass
class OptimConfig:
    """AdamW (run by DeepSpeed: FusedAdam on CUDA, DeepSpeedCPUAdam with ``deepspeed.offload_optimizer``,
    torch's AdamW on CPU without offload; see ``deepspeed_config.py``) and a warmup + decay learning-rate schedule.

    ``schedule``: after ``warmup_steps`` of linear warmup from 0, the rate stays at ``lr`` (constant),
    falls linearly to ``min_lr_ratio * lr`` at ``train.max_steps`` (linear), or follows a half cosine to
    the same floor (cosine). ``max_grad_norm <= 0`` turns clipping off. One optimizer step consumes
    ``gradient_accumulation_steps`` micro batches per rank. Every number must be finite (the loader's
    rule); ``lr`` and ``eps`` > 0, ``betas`` in [0, 1), ``weight_decay`` >= 0, ``min_lr_ratio`` in [0, 1].
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"config key 'optim.lr' must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"config key 'optim.betas' must lie in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"config key 'optim.eps' must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key 'optim.weight_decay' must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'optim.warmup_steps' must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'optim.min_lr_ratio' must lie in [0, 1], got {self.min_lr_ratio}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(
                f"config key 'optim.gradient_accumulation_steps' must be >= 1, got {self.gradient_accumulation_steps}"
            )


@dataclass
class RunConfig:
    """The ``train`` section: how long, how big, where to write and when.

    ``resume``: ``auto`` continues from ``output_dir``'s latest complete checkpoint if there is one,
    ``none`` always starts fresh (and refuses an ``output_dir`` that already holds checkpoints, so a run
    never overwrites another one's), any other value is a checkpoint directory to continue from.
    ``save_every``/``log_every``/``sample_every`` count optimizer steps; 0 turns periodic saving or
    sampling off (a final checkpoint is still written when ``save_final`` is true).
    """

    micro_batch_size: int = 4
    max_steps: int = 1000
    seed: int = 0
    output_dir: str = "runs/twinflow"
    save_every: int = 500
    save_final: bool = True
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0
    max_consecutive_nonfinite: int = 5
    resume: str = "auto"

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "max_steps", "keep_last", "log_every", "max_consecutive_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "sample_every", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'train.{key}' must be >= 0, got {getattr(self, key)}")
        if not self.output_dir:
            raise ConfigError("config key 'train.output_dir' must not be empty")
        if not self.resume:
            raise ConfigError("config key 'train.resume' must be 'auto', 'none' or a checkpoint directory")


OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
)
"""Top-level DeepSpeed keys derived from the typed config; ``deepspeed.extra`` may not set them."""

OWNED_ZERO_KEYS = ("stage", "offload_optimizer", "offload_param")


def check_deepspeed_extra(extra: dict[str, Any]) -> None:
    """Refuse ``deepspeed.extra`` settings the trainer owns or does not support, naming them."""
    owned = sorted(k for k in extra if k in OWNED_KEYS)
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("config key 'deepspeed.extra.zero_optimization' must be a mapping")
    owned += sorted(f"zero_optimization.{k}" for k in zero if k in OWNED_ZERO_KEYS)
    if owned:
        raise ConfigError(
            f"config key(s) {', '.join(f'deepspeed.extra.{k}' for k in owned)} are derived from the typed "
            "config (optim.*, train.micro_batch_size, deepspeed.zero_stage/bf16/offload_*); set those instead"
        )
    if zero.get("zero_hpz_partition_size", 1) != 1:
        raise ConfigError(
            "config key 'deepspeed.extra.zero_optimization.zero_hpz_partition_size': hpZ secondary partitions "
            "are not supported (the shard EMA swaps the primary partition only)"
        )


@dataclass
class DeepSpeedSection:
    """DeepSpeed settings the trainer turns into a DeepSpeed config (see ``deepspeed_config.py``).

    ``zero_stage`` must be 3: parameters, gradients and optimizer state are partitioned (the model is
    built under ``deepspeed.zero.Init``), the teacher EMA is kept as shards (``method/teachers/zero3.py``) and
    checkpoints store each rank's partitions. ZeRO-3 also runs on a single rank, so small models use the
    same path; stages 0-2 are not implemented by this trainer. ``bf16`` trains with bf16 parameters and fp32 master weights; off means fp32
    throughout (CPU tests). ``extra`` is merged last into the generated JSON for settings this section
    does not name (e.g. ``zero_optimization.stage3_prefetch_bucket_size``); keys the trainer owns
    (batch sizes, optimizer, scheduler, clipping) are refused there with an error naming them.
    """

    zero_stage: int = 3
    bf16: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage != 3:
            raise ConfigError(
                f"config key 'deepspeed.zero_stage' must be 3 (got {self.zero_stage}): the trainer's EMA shards and "
                "checkpoints work on ZeRO-3 partitions; a single rank runs ZeRO-3 as well"
            )
        check_deepspeed_extra(self.extra)


@dataclass
class SamplingSection:
    """Sample grids rendered during training: every prompt at every preset of ``presets``.

    ``presets`` name :data:`twinflow.sampling.config.SAMPLER_PRESETS` entries; the default covers 1, 2,
    4 and 30 NFE. ``height``/``width`` are in pixels (the latent is 8x smaller). ``seed`` fixes the noise
    so grids of different steps are comparable. With ``train.sample_every > 0`` both lists must be
    non-empty (checked by :class:`TrainConfig`).
    """

    prompts: list[str] = field(default_factory=lambda: ["a photo of a red cat sitting on a blue mat"])
    presets: list[str] = field(default_factory=lambda: ["one_step", "few_step", "any_step", "multi_step"])
    seed: int = 0
    height: int = 512
    width: int = 512

    def __post_init__(self) -> None:
        for i, name in enumerate(self.presets):
            if name not in SAMPLER_PRESETS:
                raise ConfigError(
                    f"config key 'sampling.presets[{i}]': unknown preset {name!r}; choose from {sorted(SAMPLER_PRESETS)}"
                )
        for key in ("height", "width"):
            if getattr(self, key) < 16 or getattr(self, key) % 16:
                raise ConfigError(f"config key 'sampling.{key}' must be a positive multiple of 16, got {getattr(self, key)}")


@dataclass
class FaultConfig:
    """Test hooks that break a run on purpose, to prove the failure paths. All off by default.

    * ``nonfinite_loss_steps``: optimizer steps (1-based, counted over attempted steps) whose loss is
      replaced by NaN on every rank, to exercise skip-and-count and the consecutive limit.
    * ``kill_at_step`` / ``kill_rank``: that rank exits abruptly (``os._exit``) right after that step.
    * ``crash_in_save_at_step``: the save at that step exits abruptly after writing part of its files.
    * ``fail_commit_at_step``: rank 0 alone raises ``OSError`` in the commit of the save at that step (as
      a full disk would); every rank must then fail with its message instead of waiting.
    * ``crash_in_prune_at_step``: the save at that step exits abruptly (rank 0) while pruning, after an
      old checkpoint was moved to ``.trash-step_N`` and before it is deleted.
    """

    nonfinite_loss_steps: list[int] = field(default_factory=list)
    kill_at_step: Optional[int] = None
    kill_rank: int = 0
    crash_in_save_at_step: Optional[int] = None
    fail_commit_at_step: Optional[int] = None
    crash_in_prune_at_step: Optional[int] = None


@dataclass
class TrainConfig:
    """The whole run. See the module docstring for the sections."""

    model: ModelConfig
    method: TwinFlowConfig = field(default_factory=TwinFlowConfig)
    data: Optional[DataConfig] = None
    synthetic_data: Optional[SyntheticDataConfig] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    kernels: KernelChoice = "auto"
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.synthetic_data is None):
            raise ConfigError("exactly one of config sections 'data' and 'synthetic_data' must be set")
        self._check_precision()
        self._check_edit()
        self._check_image_free()
        self._propagate_kernels()
        self._check_batch_split()
        self._check_data_shapes()
        self._check_sampling()

    def _check_precision(self) -> None:
        want = "bfloat16" if self.deepspeed.bf16 else "float32"
        if self.model.dtype != want:
            raise ConfigError(
                f"config key 'model.dtype' is {self.model.dtype!r} but deepspeed.bf16={self.deepspeed.bf16} "
                f"trains {want} parameters; set model.dtype: {want}"
            )

    def _check_edit(self) -> None:
        with_reference = self.data.has_reference if self.data is not None else self.synthetic_data.edit
        if with_reference != self.model.edit:
            source = "data.ref_image_column / data.ref_suffix" if self.data is not None else "synthetic_data.edit"
            raise ConfigError(
                f"config key 'model.edit' is {self.model.edit} but the data {'has' if with_reference else 'has no'} "
                f"reference images ({source}); an edit model trains on (reference, target) pairs and only it"
            )

    def _check_image_free(self) -> None:
        if self.data is not None and self.data.prompts_only:
            check_prompts_only_data(self.method.use_image_free)

    def _propagate_kernels(self) -> None:
        """``kernels`` is the one switch. The objective and the EMA take it as given (their ``auto``
        picks per tensor device). The backbone's dual-time embedding has no ``auto``: it gets Triton
        when CUDA is present (on CPU Triton needs its interpreter, far too slow for a model forward)."""
        if self.method.kernels != self.kernels:
            self.method = dataclasses.replace(self.method, kernels=self.kernels)
        model_kernels = self.kernels
        if model_kernels == "auto":
            model_kernels = "triton" if torch.cuda.is_available() else "eager"
        self.model.kernels = model_kernels

    def _check_batch_split(self) -> None:
        try:
            split_batch(self.train.micro_batch_size, self.method.probs.as_dict())
        except ValueError as e:
            active = [g for g, w in self.method.probs.as_dict().items() if w > 0]
            raise ConfigError(
                f"config key 'train.micro_batch_size' = {self.train.micro_batch_size} is smaller than the "
                f"{len(active)} active method groups {active} (method.probs); every active group needs at "
                f"least one sample per micro batch: {e}"
            ) from e

    def _check_data_shapes(self) -> None:
        """Synthetic data against an inline transformer (a cache is checked by :meth:`check_inputs`)."""
        if self.data is not None and not self.data.use_cache:
            raise ConfigError(
                "config key 'data.use_cache' must be true: the trainer reads the latent/text cache "
                "(build it with `python -m twinflow.data.precompute --config <config>`)"
            )
        if self.synthetic_data is not None:
            backbone_spec(self.model).check_data_shapes(self.model, self._synthetic_shapes(), read_files=False)

    def _synthetic_shapes(self) -> DataShapes:
        s = self.synthetic_data
        return DataShapes(s.latent_channels, s.latent_size, s.latent_size, {"embed_dim": s.text_dim},
                          "synthetic_data.latent_channels", "synthetic_data.latent_size", "synthetic_data.text_dim")

    def _check_sampling(self) -> None:
        if self.train.sample_every <= 0:
            return
        for key in ("prompts", "presets"):
            if not getattr(self.sampling, key):
                raise ConfigError(f"config key 'sampling.{key}' is empty but train.sample_every="
                                  f"{self.train.sample_every} samples; give at least one or set train.sample_every: 0")
        if self.data is not None and self.model.edit:
            raise ConfigError(
                "config key 'train.sample_every': sample grids of an edit model need reference images, which "
                "sampling.prompts cannot give; set train.sample_every: 0"
            )

    def check_inputs(self) -> None:
        """The checks that read files, run once before any rank starts (``twinflow train``, and every
        rank of ``python -m twinflow.train`` before it builds anything): the pretrained model's config,
        a ``train.resume`` checkpoint, and the cache (its manifest, its fingerprint against ``data``,
        its latent and text shapes against the model). :class:`ConfigError` naming the key and file."""
        from twinflow.data.cache import check_fingerprint, data_fingerprint, read_manifest
        from twinflow.data.stats import DataError

        from .checkpoint import META, is_complete

        spec = backbone_spec(self.model)
        spec.check_model_files(self.model)

        resume = self.train.resume
        if resume not in ("auto", "none") and not is_complete(resume):
            what = "does not exist" if not Path(resume).exists() else f"is not a complete checkpoint (no {META})"
            raise ConfigError(f"config key 'train.resume': {resume} {what}")
        if self.data is None:
            spec.check_data_shapes(self.model, self._synthetic_shapes(), read_files=True)
            return
        try:
            manifest = read_manifest(self.data.cache_dir)
            check_fingerprint(manifest, data_fingerprint(self.data), self.data.cache_dir)
        except DataError as e:
            raise ConfigError(f"config key 'data.cache_dir': {e}") from e
        if spec_for_cache_format(manifest["format"]) is not spec:
            raise ConfigError(f"config key 'model.family' is {self.model.family!r} but the cache {self.data.cache_dir} "
                              f"is a {manifest['format']!r} cache")
        channels, height, width = manifest["latent_shape"]
        where = f"data.cache_dir ({self.data.cache_dir})"
        spec.check_data_shapes(self.model, DataShapes(channels, height, width, manifest, where, where, where),
                               read_files=True)
        has_ref = spec.cache_schema.has_reference(manifest)
        if has_ref != self.model.edit:
            raise ConfigError(f"config key 'model.edit' is {self.model.edit} but the cache {self.data.cache_dir} "
                              f"{'has' if has_ref else 'has no'} reference latents")
        encoder = manifest["fingerprint"].get("model_path")
        if self.train.sample_every > 0 and not (encoder and Path(encoder).is_dir()):
            raise ConfigError(f"config key 'train.sample_every': sample prompts are encoded with the text encoder "
                              f"the cache {self.data.cache_dir} was built with, {encoder}, which is not a folder here")

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None, *,
                      check_inputs: bool = False) -> TrainConfig:
    """Strictly load a :class:`TrainConfig` from YAML ``path`` with ``key.path=value`` overrides;
    ``check_inputs`` also runs :meth:`TrainConfig.check_inputs` (the files the run will read)."""
    config = load_config(TrainConfig, path, overrides)
    if check_inputs:
        config.check_inputs()
    return config


RESOLVED_CONFIG = "resolved_config.yaml"
"""Written under ``train.output_dir`` by the run logger at every start: :func:`resolved_yaml` of the run."""


def resolved_yaml(config: TrainConfig) -> str:
    """The fully resolved config as YAML: every key in field order, defaults and preset values included,
    so a run's settings can be read without knowing the defaults. Loading it gives the same config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
