"""The memory plan of a training config: its inventory, activation shape, ZeRO-3 settings and teacher.

The backbone-specific numbers (parameters, width, patch size, activation profile, latent compression,
text length, encoder sizes) come from the config's backbone family (:mod:`twinflow.backbones.registry`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinflow.backbones.registry import MemoryInventory, backbone_spec
from twinflow.utils.typed_config import ConfigError

from .inventory import ParamInventory, backbone_inventory
from .terms import GiB, ActivationShape, MemoryPlan, TeacherKind, ZeroSettings, frozen_pass_terms, plan_for_model

if TYPE_CHECKING:
    from twinflow.training.config import TrainConfig


def teacher_kind(ema_decay_rate: float) -> TeacherKind:
    """Which teacher weights the run keeps (ALGORITHM.md §3.5)."""
    from twinflow.method.teachers import TeacherKind as Kind

    return Kind.from_decay_rate(ema_decay_rate).value


def largest_teacher_rows(micro_batch: int, method: Any) -> int:
    """Rows of the largest no-grad pass of one step, as the objective's step plan runs it: one-step fakes
    (adv rows, or the whole batch in image-free mode), guidance (2 x guided rows, bounded by the non-adv
    rows), RCGM (non-adv rows) and rectification (2 x e2e rows)."""
    from twinflow.method.groups import split_batch
    from twinflow.method.step_plan import StepPlan

    return StepPlan.from_config(method).largest_no_grad_rows(split_batch(micro_batch, method.probs.as_dict()))


def _run_geometry(cfg: TrainConfig, patch: int, factor: int) -> tuple[int, int, str]:
    """``(image tokens per row, latent side, description)``: the latent codec's ``factor``x compression
    and the transformer's patch packing; an edit model also attends to the reference image's tokens."""
    if cfg.data is not None:
        latent = cfg.data.image_size // factor
        origin = f"images {cfg.data.image_size} px -> {latent}x{latent} latent"
    else:
        latent = cfg.synthetic_data.latent_size
        origin = f"synthetic {latent}x{latent} latents"
    tokens = (latent // patch) ** 2 * (2 if cfg.model.edit else 1)
    desc = f"{origin}, {patch}x{patch} packing -> {tokens} image tokens{' (target + reference)' if cfg.model.edit else ''}"
    return tokens, latent, desc


def max_text_tokens(cfg: TrainConfig) -> tuple[int, str]:
    """The longest text a batch can be padded to, and where that number comes from: the synthetic
    data's ``max_text_len``, the length the cache was encoded with (from its manifest, when the cache
    is on this machine), else the encoder's limit (Qwen-Image: 1024 tokens after the template)."""
    if cfg.synthetic_data is not None:
        return cfg.synthetic_data.max_text_len, "synthetic_data.max_text_len"
    from twinflow.data.cache import read_manifest
    from twinflow.data.stats import DataError

    spec = backbone_spec(cfg.model)
    try:
        fingerprint = read_manifest(cfg.data.cache_dir)["fingerprint"]
    except (DataError, TypeError):
        return spec.max_text_tokens(None), "no cache at data.cache_dir: the text encoder's limit; set --text-tokens if shorter"
    return spec.max_text_tokens(fingerprint), f"max_sequence_length of the cache in {cfg.data.cache_dir}"


def _config_plan(
    cfg: TrainConfig, inv: ParamInventory, memory: MemoryInventory, world_size: int, gpu_mem_gib: float,
    text_tokens: int, text_source: str, cuda_context_gib: float, fragmentation: float, title: str,
) -> MemoryPlan:
    from twinflow.training.deepspeed_config import build_deepspeed_config

    zero = ZeroSettings.from_deepspeed_config(build_deepspeed_config(cfg, world_size, on_cpu=False), world_size)
    spec = backbone_spec(cfg.model)
    image_tokens, _, geometry = _run_geometry(cfg, memory.patch_size, spec.latent_factor())
    micro = cfg.train.micro_batch_size
    shape = ActivationShape(
        main_rows=micro,
        teacher_rows=largest_teacher_rows(micro, cfg.method),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        width=memory.width,
        num_blocks=inv.num_blocks,
        profile=memory.activations,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    resident_encoders = cfg.data is not None and not cfg.data.use_cache
    plan = plan_for_model(
        inv, zero, shape,
        teacher=teacher_kind(cfg.method.ema_decay_rate),
        encoder_params={**memory.resident_frozen, **(spec.encoder_params() if resident_encoders else {})},
        extra_terms=frozen_pass_terms(memory.frozen_pass, micro, cfg.model.gradient_checkpointing)
        if memory.frozen_pass is not None else (),
        gpu_mem_gib=gpu_mem_gib, cuda_context_gib=cuda_context_gib, fragmentation=fragmentation, title=title,
    )
    plan.assumptions.append(f"{geometry}; text padded to {text_tokens} tokens ({text_source})")
    plan.assumptions.append(
        "text encoder and VAE: resident in bf16 on every rank (data.use_cache is false)" if resident_encoders else
        "text encoder and VAE: not on the GPU (training reads the latent/text cache; sample grids encode prompts "
        "and decode latents on rank 0's CPU)"
    )
    return plan


def _alternatives(cfg: TrainConfig) -> list[str]:
    """Single config changes that lower memory, as ``key=value`` overrides valid for this config."""
    from twinflow.method.config import GROUPS

    out = []
    if cfg.data is not None and not cfg.data.use_cache and cfg.data.cache_dir:
        out.append("data.use_cache=true")
    if not cfg.model.gradient_checkpointing:
        out.append("model.gradient_checkpointing=true")
    if not cfg.deepspeed.offload_optimizer:
        out.append("deepspeed.offload_optimizer=true")
    smallest = sum(1 for g in GROUPS if cfg.method.probs.as_dict()[g] > 0)
    if cfg.train.micro_batch_size > smallest:
        out.append(f"train.micro_batch_size={smallest}")
    zero_extra = cfg.deepspeed.extra.get("zero_optimization", {})
    if int(zero_extra.get("sub_group_size", 1_000_000_000)) > 100_000_000:
        out.append("deepspeed.extra.zero_optimization.sub_group_size=100000000")
    return out


def plan_from_config(
    cfg: TrainConfig,
    world_size: int,
    gpu_mem_gib: float,
    *,
    text_tokens: int | None = None,
    cuda_context_gib: float = 2.0,
    fragmentation: float = 0.10,
    config_name: str = "",
) -> MemoryPlan:
    """The plan of a :class:`TrainConfig` on ``world_size`` GPUs of ``gpu_mem_gib`` GiB. When it does
    not fit, each single config change that lowers memory is planned too and listed with its total.

    ``text_tokens`` (per row) defaults to the longest text the run can see: see :func:`max_text_tokens`.
    """
    from twinflow.training.config import TrainConfig
    from twinflow.utils.typed_config import apply_overrides, from_dict, to_dict

    if cfg.model.lora.enabled:
        raise ConfigError("config key 'model.lora.enabled': the memory plan covers full training; set it to false")
    if text_tokens is None:
        text_tokens, text_source = max_text_tokens(cfg)
    elif text_tokens < 1:
        raise ConfigError(f"--text-tokens must be >= 1, got {text_tokens}")
    else:
        text_source = "--text-tokens"
    inv, memory = backbone_inventory(cfg.model)
    title = f"memory plan{' for ' + config_name if config_name else ''}: {world_size} GPUs x {gpu_mem_gib} GiB, ZeRO-3"
    args = (inv, memory, world_size, gpu_mem_gib, text_tokens, text_source, cuda_context_gib, fragmentation, title)
    plan = _config_plan(cfg, *args)
    plan.assumptions.insert(1, f"transformer architecture: {memory.architecture_source}")
    if not plan.fits:
        for override in _alternatives(cfg):
            changed = from_dict(TrainConfig, apply_overrides(to_dict(cfg), [override]))
            alt = _config_plan(changed, *args)
            plan.alternatives.append(
                f"{override}: {alt.gpu_bytes() / GiB:.2f} GiB per GPU ({'fits' if alt.fits else 'still does not fit'})"
            )
    return plan

