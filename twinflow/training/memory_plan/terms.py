"""The terms of a per-GPU memory plan and their arithmetic (ZeRO-3 model states, gathered parameters,
EMA, activations, encoders, overheads); the sources of each number are in the package docstring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from twinflow.backbones.registry import ActivationProfile
from twinflow.utils.typed_config import ConfigError

from .inventory import ParamInventory

GiB = 2**30

TermGroup = Literal["model states", "gathered parameters", "EMA", "activations", "encoders", "overheads"]
GROUP_ORDER: tuple[TermGroup, ...] = (
    "model states",
    "gathered parameters",
    "EMA",
    "activations",
    "encoders",
    "overheads",
)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 values the plan needs, as DeepSpeed would resolve them (its defaults included)."""

    world_size: int
    param_bytes: int = 2
    grad_accum_bytes: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 2**63 - 1
    sub_group_size: int = 1_000_000_000
    contiguous_gradients: bool = True

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {self.world_size}")

    @classmethod
    def from_deepspeed_config(cls, ds_config: Mapping[str, Any], world_size: int) -> ZeroSettings:
        """Resolve a DeepSpeed JSON dict through DeepSpeed's own ZeRO config model, so aliases
        (``stage3_prefetch_bucket_size``) and defaults are DeepSpeed's."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero_dict = dict(ds_config.get("zero_optimization", {}))
        if zero_dict.get("stage") != 3:
            raise ConfigError(f"config key 'deepspeed.zero_stage': the memory plan covers ZeRO stage 3, got {zero_dict.get('stage')}")
        zero = DeepSpeedZeroConfig(**zero_dict)
        bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
        param_bytes = 2 if (bf16 or fp16) else 4
        accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
        accum_bytes = param_bytes if accum is None else {"fp32": 4, "bf16": 2, "fp16": 2}[str(accum)]
        return cls(
            world_size=world_size,
            param_bytes=param_bytes,
            grad_accum_bytes=accum_bytes,
            offload_optimizer=zero.offload_optimizer is not None and str(zero.offload_optimizer.device) != "none",
            offload_param=zero.offload_param is not None and str(zero.offload_param.device) != "none",
            reduce_bucket_size=int(zero.reduce_bucket_size),
            prefetch_bucket_size=int(zero.prefetch_bucket_size),
            max_live_parameters=int(zero.max_live_parameters),
            param_persistence_threshold=int(zero.param_persistence_threshold),
            model_persistence_threshold=int(zero.model_persistence_threshold),
            sub_group_size=int(zero.sub_group_size),
            contiguous_gradients=bool(zero.contiguous_gradients),
        )


@dataclass(frozen=True)
class ActivationShape:
    """What the activation terms depend on.

    ``main_rows``: rows of the main (with-grad) forward, the micro batch. ``teacher_rows``: rows of the
    largest no-grad pass. ``image_tokens``/``text_tokens``: sequence lengths per row. ``width``: the
    transformer's hidden width D; ``num_blocks`` its depth; ``profile`` what its blocks keep per token
    (the backbone's, ``MemoryInventory.activations``).
    """

    main_rows: int
    teacher_rows: int
    image_tokens: int
    text_tokens: int
    width: int
    num_blocks: int
    profile: ActivationProfile
    gradient_checkpointing: bool = True

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclass(frozen=True)
class PlanTerm:
    """One line of the plan: ``nbytes`` on ``device`` ("gpu" or "cpu"), how it was computed, and
    whether it is exact (from counts and DeepSpeed's code), measured, or an estimate."""

    key: str
    group: TermGroup
    label: str
    nbytes: int
    formula: str
    basis: Literal["exact", "measured", "estimate", "assumption"] = "exact"
    device: Literal["gpu", "cpu"] = "gpu"


@dataclass
class MemoryPlan:
    """The terms of one rank, the device size and the verdict."""

    terms: list[PlanTerm]
    gpu_mem_bytes: int
    assumptions: list[str] = field(default_factory=list)
    title: str = "memory plan"
    alternatives: list[str] = field(default_factory=list)

    def term(self, key: str) -> PlanTerm:
        for t in self.terms:
            if t.key == key:
                return t
        raise KeyError(key)

    def gpu_bytes(self, group: TermGroup | None = None) -> int:
        return sum(t.nbytes for t in self.terms if t.device == "gpu" and (group is None or t.group == group))

    def cpu_bytes(self) -> int:
        return sum(t.nbytes for t in self.terms if t.device == "cpu")

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_mem_bytes - self.gpu_bytes()

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def verdict(self) -> str:
        used, cap = self.gpu_bytes() / GiB, self.gpu_mem_bytes / GiB
        if self.fits:
            return f"FITS: {used:.2f} GiB of {cap:.2f} GiB per GPU, {self.headroom_bytes / GiB:.2f} GiB headroom"
        largest = max((t for t in self.terms if t.device == "gpu"), key=lambda t: t.nbytes)
        return (
            f"DOES NOT FIT: {used:.2f} GiB needed per GPU but only {cap:.2f} GiB available "
            f"(short by {-self.headroom_bytes / GiB:.2f} GiB; largest term: {largest.label}, {largest.nbytes / GiB:.2f} GiB)"
        )

    def format_table(self) -> str:
        """The table the CLI prints: every term with its formula and basis, group subtotals, the
        assumptions and the verdict."""
        rows = [f"{self.title}", f"{'term':<52} {'GiB':>8}  {'where':<5} {'basis':<10} formula", "-" * 120]
        for group in GROUP_ORDER:
            terms = [t for t in self.terms if t.group == group]
            if not terms:
                continue
            for t in terms:
                rows.append(f"{t.label:<52} {t.nbytes / GiB:8.2f}  {t.device:<5} {t.basis:<10} {t.formula}")
            rows.append(f"{'  = ' + group + ' (GPU)':<52} {self.gpu_bytes(group) / GiB:8.2f}")
        rows.append("-" * 120)
        rows.append(f"{'total per GPU':<52} {self.gpu_bytes() / GiB:8.2f}")
        rows.append(f"{'device memory per GPU':<52} {self.gpu_mem_bytes / GiB:8.2f}")
        if self.cpu_bytes():
            rows.append(f"{'host memory per rank (offloaded terms)':<52} {self.cpu_bytes() / GiB:8.2f}")
        rows.append("")
        rows.append("assumptions:")
        rows.extend(f"  - {a}" for a in self.assumptions)
        rows.append("")
        rows.append(self.verdict())
        if self.alternatives:
            rows.append("single changes and the total each gives:")
            rows.extend(f"  - {a}" for a in self.alternatives)
        return "\n".join(rows)



TeacherKind = Literal["ema", "frozen", "online"]


def _model_state_terms(inv: ParamInventory, z: ZeroSettings) -> list[PlanTerm]:
    n = z.world_size
    part = inv.partition_numel(n)
    opt_dev = "cpu" if z.offload_optimizer else "gpu"
    sub = inv.largest_subgroup_partition(n, z.sub_group_size)
    persistent = inv.persistent_numel(z.param_persistence_threshold, z.model_persistence_threshold)
    terms = [
        PlanTerm("param_partition", "model states", f"parameters, {z.param_bytes}-byte partition", z.param_bytes * part,
                 f"{z.param_bytes} B x {part:,} partition elements"),
        PlanTerm("persistent_params", "model states", "persistent parameters (kept gathered)", z.param_bytes * persistent,
                 f"{z.param_bytes} B x {persistent:,} (params <= {z.param_persistence_threshold:,} elements)"),
        PlanTerm("master_fp32", "model states", "fp32 master partition", 4 * part, f"4 B x {part:,}", device=opt_dev),
        PlanTerm("adam_moments", "model states", "Adam m and v (fp32)", 8 * part, f"2 x 4 B x {part:,}", device=opt_dev),
        PlanTerm("grad_partition", "model states", f"gradient partitions ({z.grad_accum_bytes}-byte grad_accum_dtype)",
                 z.grad_accum_bytes * part, f"{z.grad_accum_bytes} B x {part:,}", device=opt_dev),
    ]
    if z.offload_optimizer:
        terms.append(PlanTerm("step_grad_fp32", "model states", "fp32 gradients of the optimizer step (pinned)", 4 * part,
                              f"4 B x {part:,} (one buffer per sub-group)", device="cpu"))
    else:
        terms.append(PlanTerm("step_grad_fp32", "model states", "fp32 gradient buffer of the optimizer step", 4 * sub,
                              f"4 B x {sub:,} (largest sub-group, sub_group_size {z.sub_group_size:,})"))
    if z.contiguous_gradients:
        terms.append(PlanTerm("reduce_bucket", "model states", "reduce bucket", z.param_bytes * z.reduce_bucket_size,
                              f"{z.param_bytes} B x reduce_bucket_size {z.reduce_bucket_size:,}"))
    return terms


def _gathered_terms(inv: ParamInventory, z: ZeroSettings) -> list[PlanTerm]:
    live = min(z.max_live_parameters, inv.largest_block + z.prefetch_bucket_size)
    live = max(live, inv.largest_module)  # a module's own parameters are always gathered to run it
    return [
        PlanTerm("gathered_params", "gathered parameters", "gathered parameters (block + prefetch)", z.param_bytes * live,
                 f"{z.param_bytes} B x min(max_live {z.max_live_parameters:,}, block {inv.largest_block:,} + prefetch "
                 f"{z.prefetch_bucket_size:,})"),
        PlanTerm("module_full_grad", "gathered parameters", "full gradient of the largest module", z.param_bytes * inv.largest_module,
                 f"{z.param_bytes} B x {inv.largest_module:,} (before reduce-scatter)"),
    ]


def _teacher_terms(inv: ParamInventory, z: ZeroSettings, teacher: TeacherKind) -> list[PlanTerm]:
    if teacher == "online":
        return []
    part = inv.partition_numel(z.world_size)
    where = "cpu" if z.offload_optimizer else "gpu"
    terms = []
    if teacher == "ema":
        terms.append(PlanTerm("ema_fp32", "EMA", "EMA partition (fp32)", 4 * part, f"4 B x {part:,}", device=where))
    label = "teacher shadow partition" if teacher == "ema" else "frozen teacher partition"
    terms.append(PlanTerm("ema_shadow", "EMA", f"{label} ({z.param_bytes}-byte)", z.param_bytes * part,
                          f"{z.param_bytes} B x {part:,}", device=where))
    if z.offload_optimizer:
        terms.append(PlanTerm("shadow_on_gpu", "EMA", "shadow copied to the GPU for a teacher session", z.param_bytes * part,
                              f"{z.param_bytes} B x {part:,} (transient)"))
    return terms


def _activation_terms(a: ActivationShape) -> list[PlanTerm]:
    d, tok = a.width, a.tokens
    bf16 = 2
    p = a.profile
    per_token_saved = p.saved_bytes_per_width * d + p.saved_bytes_constant
    terms = []
    if a.gradient_checkpointing:
        ckpt = a.num_blocks * a.main_rows * tok * d * bf16
        terms.append(PlanTerm("ckpt_inputs", "activations", "checkpointed block inputs (main forward)", ckpt,
                              f"{a.num_blocks} blocks x {a.main_rows} rows x {tok} tokens x D {d} x 2 B"))
        recompute = int(a.main_rows * tok * per_token_saved)
        terms.append(PlanTerm("block_recompute", "activations", "one block recomputed for backward", recompute,
                              f"{a.main_rows} rows x {tok} tokens x ({p.saved_bytes_per_width} x D + {p.saved_bytes_constant}) B",
                              basis="measured"))
    else:
        saved = int(a.num_blocks * a.main_rows * tok * per_token_saved)
        terms.append(PlanTerm("block_saved", "activations", "saved activations of every block (no checkpointing)", saved,
                              f"{a.num_blocks} x {a.main_rows} rows x {tok} tokens x ({p.saved_bytes_per_width} x D + "
                              f"{p.saved_bytes_constant}) B", basis="measured"))
    non_block = a.main_rows * tok * p.non_block_widths * d * bf16
    terms.append(PlanTerm("non_block", "activations", "activations outside the blocks", non_block,
                          f"{a.main_rows} rows x {tok} tokens x {p.non_block_widths} x D x 2 B", basis="estimate"))
    backward = a.main_rows * tok * p.backward_transient_widths * d * bf16
    teacher = a.teacher_rows * tok * p.no_grad_block_widths * d * bf16
    # The backward transients and a teacher block's working set never coexist (teacher passes run
    # between the main forward and its backward); the plan carries the larger of the two.
    if backward >= teacher:
        terms.append(PlanTerm("peak_transient", "activations", "block backward gradients (> teacher pass)", backward,
                              f"{a.main_rows} rows x {tok} tokens x {p.backward_transient_widths} x D x 2 B", basis="estimate"))
    else:
        terms.append(PlanTerm("peak_transient", "activations", f"teacher block working set ({a.teacher_rows} rows)", teacher,
                              f"{a.teacher_rows} rows x {tok} tokens x {p.no_grad_block_widths} x D x 2 B", basis="estimate"))
    return terms


def frozen_pass_terms(f: Any, rows: int, gradient_checkpointing: bool) -> list[PlanTerm]:
    """The activations of a frozen model that gradients pass through (``FrozenPassActivations``), for
    ``rows`` rows of the main forward: its layers' inputs and one recomputed layer with checkpointing,
    else every layer's saved tensors."""
    per_layer = int(rows * f.tokens * f.saved_widths_per_layer * f.width * 2)
    where = f"{rows} rows x {f.tokens} tokens ({f.tokens_source})"
    if not gradient_checkpointing:
        return [PlanTerm("frozen_pass_saved", "activations", f"{f.label}: saved activations of every layer",
                         f.layers * per_layer, f"{f.layers} layers x {where} x {f.saved_widths_per_layer} x D {f.width} x 2 B",
                         basis="estimate")]
    inputs = f.layers * rows * f.tokens * f.width * 2
    return [
        PlanTerm("frozen_pass_inputs", "activations", f"{f.label}: checkpointed layer inputs", inputs,
                 f"{f.layers} layers x {where} x D {f.width} x 2 B", basis="estimate"),
        PlanTerm("frozen_pass_recompute", "activations", f"{f.label}: one layer recomputed for backward", per_layer,
                 f"{where} x {f.saved_widths_per_layer} x D {f.width} x 2 B", basis="estimate"),
    ]


def plan_for_model(
    num_params_by_module: Mapping[str, Sequence[int]] | ParamInventory,
    zero: ZeroSettings,
    activations: ActivationShape | None,
    *,
    teacher: TeacherKind = "ema",
    encoder_params: Mapping[str, int] | None = None,
    extra_terms: Sequence[PlanTerm] = (),
    encoder_bytes_per_param: int = 2,
    gpu_mem_gib: float = 80.0,
    cuda_context_gib: float = 2.0,
    fragmentation: float = 0.10,
    block_prefix: str = "transformer_blocks.",
    title: str = "memory plan",
) -> MemoryPlan:
    """The per-rank plan for a model given as ``{module name: its direct parameters' numels}``
    (see :func:`param_sizes_by_module`), fully trained with AdamW under ZeRO-3.

    ``activations=None`` leaves activations out (e.g. to compare model states with a measurement).
    ``encoder_params`` are resident models (name -> parameter count) kept in
    ``encoder_bytes_per_param``-byte precision on every rank. ``fragmentation`` is the fraction of
    everything allocated that the caching allocator is assumed to lose to fragmentation.
    """
    if zero.offload_param:
        raise ConfigError("config key 'deepspeed.offload_param': the memory plan does not model parameter offload")
    if not 0 <= fragmentation < 1:
        raise ConfigError(f"--fragmentation must lie in [0, 1), got {fragmentation}")
    if gpu_mem_gib <= 0:
        raise ConfigError(f"--gpu-mem must be > 0 GiB, got {gpu_mem_gib}")
    inv = (
        num_params_by_module
        if isinstance(num_params_by_module, ParamInventory)
        else ParamInventory(num_params_by_module, block_prefix)
    )
    terms = _model_state_terms(inv, zero) + _gathered_terms(inv, zero) + _teacher_terms(inv, zero, teacher)
    if activations is not None:
        terms += _activation_terms(activations)
    terms += list(extra_terms)
    for name, count in (encoder_params or {}).items():
        terms.append(PlanTerm(f"encoder_{name}", "encoders", f"{name} ({encoder_bytes_per_param}-byte, resident)",
                              encoder_bytes_per_param * count, f"{encoder_bytes_per_param} B x {count:,}"))
    allocated = sum(t.nbytes for t in terms if t.device == "gpu")
    terms.append(PlanTerm("cuda_context", "overheads", "CUDA context, NCCL and library workspaces",
                          int(cuda_context_gib * GiB), f"{cuda_context_gib} GiB", basis="assumption"))
    terms.append(PlanTerm("fragmentation", "overheads", "allocator fragmentation", int(fragmentation * allocated),
                          f"{fragmentation:.0%} of {allocated / GiB:.2f} GiB allocated", basis="assumption"))
    assumptions = [
        f"{zero.world_size} ranks; parameters in {zero.param_bytes}-byte precision, AdamW with fp32 master weights "
        f"and moments (DeepSpeed 0.19 ZeRO-3 bookkeeping; model states are exact for these settings)",
        f"total parameters {inv.total:,}; largest module {inv.largest_module:,}; largest block {inv.largest_block:,}",
        f"optimizer state {'offloaded to CPU' if zero.offload_optimizer else 'on the GPU'}; parameters not offloaded",
        f"teacher: {teacher}"
        + {"ema": " (fp32 EMA + shadow shards, teachers/zero3.py)", "frozen": " (starting weights as a shadow shard)",
           "online": " (no extra weights)"}[teacher],
        f"GPU memory: {gpu_mem_gib} GiB per device (--gpu-mem; pass what the target GPU reports, "
        "torch.cuda.get_device_properties(0).total_memory / 2**30)",
        f"CUDA context + NCCL + workspaces {cuda_context_gib} GiB and allocator fragmentation {fragmentation:.0%} "
        "are assumptions, not measurements",
        "'estimate' terms are engineering estimates; 'measured' terms come from saved-tensor measurements of "
        f"{activations.profile.measured_on if activations is not None else 'the backbone blocks'} on CPU; validate "
        "both on a GPU (see the module docstring)",
        "checkpoints are saved sharded (no 16-bit gather of the full model on one GPU)",
    ]
    if activations is not None:
        assumptions.append(
            f"activations: micro batch {activations.main_rows} rows, largest teacher pass {activations.teacher_rows} rows, "
            f"{activations.image_tokens} image + {activations.text_tokens} text tokens per row, bf16, "
            f"gradient checkpointing {'on' if activations.gradient_checkpointing else 'off'}, memory-efficient attention"
        )
    return MemoryPlan(terms, int(gpu_mem_gib * GiB), assumptions, title)

