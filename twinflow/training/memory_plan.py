"""Per-GPU memory plan of a full (non-LoRA) training run under DeepSpeed ZeRO-3 with the shard EMA teacher.

Why a plan and not a try: a 20B-parameter run that does not fit fails minutes into start-up on eight
GPUs, and the reason (optimizer states? the resident text encoder? activations?) is not in the OOM
message. This module adds up what each rank holds, term by term, states every assumption, and says
whether the total fits a given device size.

Where each number comes from:

* **Parameter counts** are exact: the transformer is instantiated from its config on the ``meta``
  device (no weights, no download), ``time_text_embed_2`` included. The text encoder (Qwen2.5-VL-7B)
  and the VAE are counted the same way from their published architecture configs.
* **Model states** follow DeepSpeed 0.19's ZeRO-3 optimizer (``runtime/zero/stage3.py``), per rank with
  N ranks and each parameter's partition ``ceil(numel / N)``: the low-precision partition
  (``lp_param_buffer``), the float32 master partition (``fp32_partitioned_groups_flat``), Adam's two
  float32 moments, the gradient partitions (``grad_partitions_flat_buffer``, in ``grad_accum_dtype``,
  which defaults to the model dtype), one float32 gradient buffer the size of the largest optimizer
  sub-group (``initialize_optimizer_states``; every sub-group's ``.grad`` is a view of it) and the
  reduce bucket (``ipg_buckets``, ``reduce_bucket_size`` elements of the gradient dtype). Parameters
  below ``stage3_param_persistence_threshold`` stay gathered (full size) on every rank.
  With ``offload_optimizer`` the master partition, moments and gradient partitions live on the CPU.
* **Gathered parameters**: ZeRO-3 gathers a module's parameters when it runs, prefetches up to
  ``stage3_prefetch_bucket_size`` elements ahead and keeps parameters that are reused within
  ``stage3_max_reuse_distance`` (1e9 by default: with gradient checkpointing a whole transformer block
  is reused by its recomputation), all capped by ``stage3_max_live_parameters``. The plan takes
  ``min(max_live, largest block + prefetch bucket)`` gathered elements, plus the full-size gradient of
  the largest single module before it is reduce-scattered. DeepSpeed's own estimator counts the
  latter pair as ``4 * largest_layer_params``.
* **EMA** (``twinflow.method.teachers.zero3``): a float32 EMA and a shadow in the parameter dtype, both
  laid out like the rank's master partition (6 bytes per partition element in bf16). The shadow is
  swapped into the partitions for the teacher passes. They live where the master partition lives; with
  an offloaded optimizer the session copies the shadow to the GPU, a transient of 2 bytes per element.
  ``ema_decay_rate == 1`` keeps the starting weights as a shadow only.
* **Activations** with gradient checkpointing: the main forward (with grad) keeps each block's inputs
  (image and text hidden states, ``rows x tokens x D`` each in bf16) for all blocks, then backward
  recomputes one block at a time. A block's saved tensors were measured on CPU with
  ``torch.autograd.graph.saved_tensors_hooks`` on diffusers 0.42's ``QwenImageTransformerBlock``
  (:func:`measure_block_saved_bytes_per_token`, widths 256 and 512): ``58.125 * D + 8`` bytes per
  token and row, i.e. 29 D-wide bf16 tensors plus float32 RMSNorm and attention statistics (the
  attention saves q, k, v, its output and the log-sum-exp, no score matrix, as the GPU's
  memory-efficient kernels do). On top of that the plan *estimates* the gradient
  transients of a block's backward (10 D-wide bf16 tensors per token) and the live set of a block
  forward without grad (12 D-wide tensors per token; the teacher passes run without grad, so they need
  one block's working set at the batch of the largest teacher pass, which coexists with the main
  forward's checkpoints because the objective runs it between forward and backward).
* **Encoders**: the Qwen2.5-VL text encoder and the VAE would stay resident in bf16 on every rank
  unless the run trains from the latent/text cache (``data.use_cache``; the trainer requires it). With
  the cache neither is on the GPU: sample grids encode their prompts and decode latents on rank 0's
  CPU (:mod:`.observability`).
* **Overheads** (assumptions, stated in the output): CUDA context, NCCL and library workspaces as a
  fixed amount, and allocator fragmentation as a fraction of everything allocated.

Validating on a GPU. :func:`plan_for_model` takes parameter sizes by module, so a reduced-depth model
(e.g. the same widths with 4 blocks) can be planned and measured: build it under
``deepspeed.zero.Init`` with the run's DeepSpeed config on N GPUs, call ``deepspeed.initialize``, run
one optimizer step with a batch of 1 and compare ``torch.cuda.memory_allocated()`` after the step (model
states, no activations) with the plan's ``model states`` and ``EMA`` groups, and
``torch.cuda.max_memory_allocated()`` with the total before overheads. The model-state terms should
agree to within the bucket sizes; the activation terms marked as estimates are what such a run calibrates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch
from torch import nn

from twinflow.backbones.qwen_image.config import TRANSFORMER_DEFAULTS
from twinflow.utils.typed_config import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

GiB = 2**30

BLOCK_SAVED_BYTES_PER_WIDTH = 58.125
"""Bytes a Qwen-Image block saves for backward per token, row and unit of hidden width D (measured;
see :func:`measure_block_saved_bytes_per_token`)."""
BLOCK_SAVED_BYTES_CONSTANT = 8
"""Width-independent bytes per token and row saved by a block (LayerNorm statistics; measured)."""
BACKWARD_TRANSIENT_WIDTHS = 10
"""Estimate: D-wide bf16 gradient tensors per token live at the peak of one block's backward (MLP
hidden gradient before and after the GELU, 4 D each, and the residual-stream gradients)."""
NO_GRAD_BLOCK_WIDTHS = 12
"""Estimate: D-wide bf16 tensors per token live at the peak of one block's forward without grad
(residual stream in and out, modulated input, q/k/v, attention output; or the MLP's 4 D hidden twice)."""
NON_BLOCK_WIDTHS = 4
"""Estimate: D-wide tensors per token saved by the layers outside the blocks (input projections,
output norm and projection) in the main forward."""

QWEN_IMAGE_TRANSFORMER = {k: v for k, v in TRANSFORMER_DEFAULTS.items()
                          if k not in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")}
"""The published Qwen-Image transformer config (``transformer/config.json`` of Qwen/Qwen-Image), which
the transformer's defaults are."""
ARCHITECTURE_KEYS = (
    *QWEN_IMAGE_TRANSFORMER,
    "zero_cond_t",
    "use_additional_t_cond",
    "use_layer3d_rope",
)
"""Keys of a pretrained ``config.json`` that shape the parameters (the rest is metadata)."""

QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "in_chans": 3,
}
"""Qwen2.5-VL-7B-Instruct's architecture (the Qwen-Image text encoder), from its published config."""

TermGroup = Literal["model states", "gathered parameters", "EMA", "activations", "encoders", "overheads"]
GROUP_ORDER: tuple[TermGroup, ...] = (
    "model states",
    "gathered parameters",
    "EMA",
    "activations",
    "encoders",
    "overheads",
)


# --------------------------------------------------------------------------------------------------
# Parameter inventories
# --------------------------------------------------------------------------------------------------


def param_sizes_by_module(model: nn.Module) -> dict[str, tuple[int, ...]]:
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


@dataclass(frozen=True)
class ParamInventory:
    """Parameter sizes by owning module, with the aggregates ZeRO-3 memory depends on.

    ``block_prefix`` names the repeated blocks (``transformer_blocks.<i>.``): with gradient
    checkpointing, the unit whose parameters stay gathered through its recomputation.
    """

    sizes_by_module: Mapping[str, Sequence[int]]
    block_prefix: str = "transformer_blocks."

    def __post_init__(self) -> None:
        if not self.sizes_by_module:
            raise ValueError("the parameter inventory is empty")
        for name, sizes in self.sizes_by_module.items():
            if not sizes or any(int(s) <= 0 for s in sizes):
                raise ValueError(f"module {name!r}: parameter sizes must be positive, got {list(sizes)}")

    def param_sizes(self) -> list[int]:
        return [int(s) for sizes in self.sizes_by_module.values() for s in sizes]

    @property
    def total(self) -> int:
        return sum(self.param_sizes())

    @property
    def largest_module(self) -> int:
        """DeepSpeed's "largest layer": the most parameters any single module owns directly."""
        return max(sum(sizes) for sizes in self.sizes_by_module.values())

    def _blocks(self) -> dict[str, int]:
        blocks: dict[str, int] = {}
        for name, sizes in self.sizes_by_module.items():
            if name.startswith(self.block_prefix):
                index = name[len(self.block_prefix):].split(".", 1)[0]
                blocks[index] = blocks.get(index, 0) + sum(sizes)
        return blocks

    @property
    def num_blocks(self) -> int:
        return len(self._blocks())

    @property
    def largest_block(self) -> int:
        """Parameters of the largest repeated block (the largest module when there are no blocks)."""
        return max(self._blocks().values(), default=self.largest_module)

    def partition_numel(self, world_size: int) -> int:
        """Elements of one rank's flat partition: every parameter padded to a multiple of N, split N ways."""
        return sum(math.ceil(s / world_size) for s in self.param_sizes())

    def largest_subgroup_partition(self, world_size: int, sub_group_size: int) -> int:
        """Elements of the rank's largest optimizer sub-group, split as DeepSpeed does: parameters are
        appended in order until the sub-group's partition reaches ``sub_group_size``."""
        parts = [math.ceil(s / world_size) for s in self.param_sizes()]
        if sub_group_size >= sum(parts):
            return sum(parts)
        largest = current = 0
        for part in parts:
            current += part
            if current >= sub_group_size:
                largest, current = max(largest, current), 0
        return max(largest, current)

    def persistent_numel(self, threshold: int, model_threshold: int) -> int:
        """Elements ZeRO-3 keeps gathered on every rank: parameters of at most ``threshold`` elements,
        in order, while their total stays within ``model_threshold``."""
        total = 0
        for s in self.param_sizes():
            if s <= threshold and total + s <= model_threshold:
                total += s
        return total


def qwen_image_inventory(transformer_config: Mapping[str, Any] | None = None, twin_embedder: bool = True) -> ParamInventory:
    """Exact parameter inventory of the TwinFlow Qwen-Image transformer, built on the ``meta`` device.

    ``transformer_config`` defaults to the published Qwen-Image config; ``twin_embedder`` adds
    ``time_text_embed_2``.
    """
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

    config = dict(QWEN_IMAGE_TRANSFORMER if transformer_config is None else transformer_config)
    config.pop("twin_embedder", None)
    with torch.device("meta"):
        model = TwinFlowQwenImageTransformer(**config, twin_embedder=twin_embedder)
    return ParamInventory(param_sizes_by_module(model))


def qwen_image_encoder_params() -> dict[str, int]:
    """Exact parameter counts of Qwen-Image's text encoder (Qwen2.5-VL-7B, vision tower and LM head
    included: the pipeline loads the whole model) and VAE, built on the ``meta`` device."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False
    )
    with torch.device("meta"):
        text = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage()  # diffusers' defaults are the Qwen-Image VAE's config
    return {"text_encoder": sum(p.numel() for p in text.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


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
    transformer's hidden width D; ``num_blocks`` its depth.
    """

    main_rows: int
    teacher_rows: int
    image_tokens: int
    text_tokens: int
    width: int
    num_blocks: int
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


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------

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
    per_token_saved = BLOCK_SAVED_BYTES_PER_WIDTH * d + BLOCK_SAVED_BYTES_CONSTANT
    terms = []
    if a.gradient_checkpointing:
        ckpt = a.num_blocks * a.main_rows * tok * d * bf16
        terms.append(PlanTerm("ckpt_inputs", "activations", "checkpointed block inputs (main forward)", ckpt,
                              f"{a.num_blocks} blocks x {a.main_rows} rows x {tok} tokens x D {d} x 2 B"))
        recompute = int(a.main_rows * tok * per_token_saved)
        terms.append(PlanTerm("block_recompute", "activations", "one block recomputed for backward", recompute,
                              f"{a.main_rows} rows x {tok} tokens x ({BLOCK_SAVED_BYTES_PER_WIDTH} x D + {BLOCK_SAVED_BYTES_CONSTANT}) B",
                              basis="measured"))
    else:
        saved = int(a.num_blocks * a.main_rows * tok * per_token_saved)
        terms.append(PlanTerm("block_saved", "activations", "saved activations of every block (no checkpointing)", saved,
                              f"{a.num_blocks} x {a.main_rows} rows x {tok} tokens x ({BLOCK_SAVED_BYTES_PER_WIDTH} x D + "
                              f"{BLOCK_SAVED_BYTES_CONSTANT}) B", basis="measured"))
    non_block = a.main_rows * tok * NON_BLOCK_WIDTHS * d * bf16
    terms.append(PlanTerm("non_block", "activations", "activations outside the blocks", non_block,
                          f"{a.main_rows} rows x {tok} tokens x {NON_BLOCK_WIDTHS} x D x 2 B", basis="estimate"))
    backward = a.main_rows * tok * BACKWARD_TRANSIENT_WIDTHS * d * bf16
    teacher = a.teacher_rows * tok * NO_GRAD_BLOCK_WIDTHS * d * bf16
    # The backward transients and a teacher block's working set never coexist (teacher passes run
    # between the main forward and its backward); the plan carries the larger of the two.
    if backward >= teacher:
        terms.append(PlanTerm("peak_transient", "activations", "block backward gradients (> teacher pass)", backward,
                              f"{a.main_rows} rows x {tok} tokens x {BACKWARD_TRANSIENT_WIDTHS} x D x 2 B", basis="estimate"))
    else:
        terms.append(PlanTerm("peak_transient", "activations", f"teacher block working set ({a.teacher_rows} rows)", teacher,
                              f"{a.teacher_rows} rows x {tok} tokens x {NO_GRAD_BLOCK_WIDTHS} x D x 2 B", basis="estimate"))
    return terms


def plan_for_model(
    num_params_by_module: Mapping[str, Sequence[int]] | ParamInventory,
    zero: ZeroSettings,
    activations: ActivationShape | None,
    *,
    teacher: TeacherKind = "ema",
    encoder_params: Mapping[str, int] | None = None,
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
        "diffusers' QwenImageTransformerBlock on CPU; validate both on a GPU (see the module docstring)",
        "checkpoints are saved sharded (no 16-bit gather of the full model on one GPU)",
    ]
    if activations is not None:
        assumptions.append(
            f"activations: micro batch {activations.main_rows} rows, largest teacher pass {activations.teacher_rows} rows, "
            f"{activations.image_tokens} image + {activations.text_tokens} text tokens per row, bf16, "
            f"gradient checkpointing {'on' if activations.gradient_checkpointing else 'off'}, memory-efficient attention"
        )
    return MemoryPlan(terms, int(gpu_mem_gib * GiB), assumptions, title)


# --------------------------------------------------------------------------------------------------
# From a training config
# --------------------------------------------------------------------------------------------------


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


def _transformer_config(cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """The transformer architecture of the run and where it came from (no weights are read)."""
    import json

    model = cfg.model
    if model.transformer is not None:
        return dict(model.transformer), "inline model.transformer config"
    from twinflow.backbones.qwen_image.config import resolve_pretrained_dir

    try:
        folder = resolve_pretrained_dir(model.pretrained)
    except ConfigError:
        return dict(QWEN_IMAGE_TRANSFORMER), (
            f"published Qwen-Image config (model.pretrained {model.pretrained} is not on this machine)"
        )
    raw = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in raw.items() if k in ARCHITECTURE_KEYS}, f"{folder / 'config.json'}"


def _run_geometry(cfg: TrainConfig, patch: int) -> tuple[int, int, str]:
    """``(image tokens per row, latent side, description)``: the VAE's 8x compression and the
    transformer's patch packing; an edit model also attends to the reference image's tokens."""
    if cfg.data is not None:
        latent = cfg.data.image_size // 8
        origin = f"images {cfg.data.image_size} px -> {latent}x{latent} latent"
    else:
        latent = cfg.synthetic_data.latent_size
        origin = f"synthetic {latent}x{latent} latents"
    tokens = (latent // patch) ** 2 * (2 if cfg.model.edit else 1)
    desc = f"{origin}, {patch}x{patch} packing -> {tokens} image tokens{' (target + reference)' if cfg.model.edit else ''}"
    return tokens, latent, desc


def max_text_tokens(cfg: TrainConfig) -> tuple[int, str]:
    """The longest text a batch can be padded to, and where that number comes from: the synthetic
    data's ``max_text_len``, the ``max_sequence_length`` the cache was encoded with (from its manifest,
    when the cache is on this machine), else the encoder's limit (1024 tokens after the template)."""
    if cfg.synthetic_data is not None:
        return cfg.synthetic_data.max_text_len, "synthetic_data.max_text_len"
    from twinflow.backbones.qwen_image.encoders import MAX_SEQUENCE_LENGTH
    from twinflow.data.cache import read_manifest
    from twinflow.data.stats import DataError

    try:
        length = int(read_manifest(cfg.data.cache_dir)["fingerprint"]["max_sequence_length"])
    except (DataError, TypeError):
        return MAX_SEQUENCE_LENGTH, "no cache at data.cache_dir: the text encoder's limit; set --text-tokens if shorter"
    return length, f"max_sequence_length of the cache in {cfg.data.cache_dir}"


def _config_plan(
    cfg: TrainConfig, inv: ParamInventory, arch: Mapping[str, Any], world_size: int, gpu_mem_gib: float,
    text_tokens: int, text_source: str, cuda_context_gib: float, fragmentation: float, title: str,
) -> MemoryPlan:
    from .deepspeed_config import build_deepspeed_config

    zero = ZeroSettings.from_deepspeed_config(build_deepspeed_config(cfg, world_size, on_cpu=False), world_size)
    image_tokens, _, geometry = _run_geometry(cfg, int(arch.get("patch_size", 2)))
    micro = cfg.train.micro_batch_size
    shape = ActivationShape(
        main_rows=micro,
        teacher_rows=largest_teacher_rows(micro, cfg.method),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        width=int(arch["attention_head_dim"]) * int(arch["num_attention_heads"]),
        num_blocks=inv.num_blocks,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    resident_encoders = cfg.data is not None and not cfg.data.use_cache
    plan = plan_for_model(
        inv, zero, shape,
        teacher=teacher_kind(cfg.method.ema_decay_rate),
        encoder_params=qwen_image_encoder_params() if resident_encoders else None,
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
    from twinflow.utils.typed_config import apply_overrides, from_dict, to_dict

    from .config import TrainConfig

    if cfg.model.lora.enabled:
        raise ConfigError("config key 'model.lora.enabled': the memory plan covers full training; set it to false")
    if text_tokens is None:
        text_tokens, text_source = max_text_tokens(cfg)
    elif text_tokens < 1:
        raise ConfigError(f"--text-tokens must be >= 1, got {text_tokens}")
    else:
        text_source = "--text-tokens"
    arch, source = _transformer_config(cfg)
    inv = qwen_image_inventory(arch, twin_embedder=cfg.model.twin_embedder)
    title = f"memory plan{' for ' + config_name if config_name else ''}: {world_size} GPUs x {gpu_mem_gib} GiB, ZeRO-3"
    args = (inv, arch, world_size, gpu_mem_gib, text_tokens, text_source, cuda_context_gib, fragmentation, title)
    plan = _config_plan(cfg, *args)
    plan.assumptions.insert(1, f"transformer architecture: {source}")
    if not plan.fits:
        for override in _alternatives(cfg):
            changed = from_dict(TrainConfig, apply_overrides(to_dict(cfg), [override]))
            alt = _config_plan(changed, *args)
            plan.alternatives.append(
                f"{override}: {alt.gpu_bytes() / GiB:.2f} GiB per GPU ({'fits' if alt.fits else 'still does not fit'})"
            )
    return plan


def measure_block_saved_bytes_per_token(num_heads: int, image_side: int, text_tokens: int, head_dim: int = 128) -> float:
    """Bytes one Qwen-Image block saves for backward per row and token, measured on CPU in bf16.

    Counts the storages handed to autograd (``saved_tensors_hooks``) except parameters, for a block of
    width ``num_heads * head_dim`` on ``image_side**2`` image and ``text_tokens`` text tokens. Tensors
    shared by all rows (rotary frequencies) are excluded by differencing batches of 3 and 2 rows (a
    single row saves less: some flattening copies become views). This is the
    measurement behind :data:`BLOCK_SAVED_BYTES_PER_WIDTH`; run it at the real width on a GPU machine
    to re-check.
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(
            num_layers=1, attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=64,
            in_channels=16, out_channels=4, axes_dims_rope=(16, (head_dim - 16) // 2, (head_dim - 16) // 2),
        ).to(torch.bfloat16)
    block = model.transformer_blocks[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    width = num_heads * head_dim

    def saved_bytes(rows: int) -> int:
        hidden = torch.randn(rows, image_side * image_side, width, dtype=torch.bfloat16, requires_grad=True)
        text = torch.randn(rows, text_tokens, width, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(rows, width, dtype=torch.bfloat16)
        rope = model.pos_embed([(1, image_side, image_side)] * rows, max_txt_seq_len=text_tokens, device=hidden.device)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None, temb=temb,
                  image_rotary_emb=rope)
        return sum(storages.values())

    return (saved_bytes(3) - saved_bytes(2)) / (image_side * image_side + text_tokens)
