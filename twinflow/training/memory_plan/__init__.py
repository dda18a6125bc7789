"""Per-GPU memory plan of a full (non-LoRA) training run under DeepSpeed ZeRO-3 with the shard EMA teacher.

Why a plan and not a try: a 20B-parameter run that does not fit fails minutes into start-up on eight
GPUs, and the reason (optimizer states? the resident text encoder? activations?) is not in the OOM
message. This module adds up what each rank holds, term by term, states every assumption, and says
whether the total fits a given device size.

Where each number comes from:

* **Parameter counts** are exact and come from the backbone (``BackboneSpec.memory_inventory``): the
  transformer is instantiated from its config on the ``meta`` device (no weights, no download),
  ``time_text_embed_2`` included. For Qwen-Image the text encoder (Qwen2.5-VL-7B) and the VAE are
  counted the same way from their published architecture configs (``backbones/qwen_image/memory.py``).
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
  recomputes one block at a time. A block's saved tensors are the backbone's ``ActivationProfile``;
  Qwen-Image's were measured on CPU with ``torch.autograd.graph.saved_tensors_hooks`` on diffusers
  0.42's ``QwenImageTransformerBlock`` (``benchmarks/block_saved_bytes.py``, widths 256 and 512):
  ``58.125 * D + 8`` bytes per token and row, i.e. 29 D-wide bf16 tensors plus float32 RMSNorm and attention statistics (the
  attention saves q, k, v, its output and the log-sum-exp, no score matrix, as the GPU's
  memory-efficient kernels do). On top of that the plan *estimates* the gradient
  transients of a block's backward (10 D-wide bf16 tensors per token) and the live set of a block
  forward without grad (12 D-wide tensors per token; the teacher passes run without grad, so they need
  one block's working set at the batch of the largest teacher pass, which coexists with the main
  forward's checkpoints because the objective runs it between forward and backward).
* **Encoders**: the Qwen2.5-VL text encoder and the VAE would stay resident in bf16 on every rank
  unless the run trains from the latent/text cache (``data.use_cache``; the trainer requires it). With
  the cache neither is on the GPU: sample grids encode their prompts and decode latents on rank 0's
  CPU (:mod:`twinflow.training.observability`).
* **Overheads** (assumptions, stated in the output): CUDA context, NCCL and library workspaces as a
  fixed amount, and allocator fragmentation as a fraction of everything allocated.

Validating on a GPU. :func:`plan_for_model` takes parameter sizes by module, so a reduced-depth model
(e.g. the same widths with 4 blocks) can be planned and measured: build it under
``deepspeed.zero.Init`` with the run's DeepSpeed config on N GPUs, call ``deepspeed.initialize``, run
one optimizer step with a batch of 1 and compare ``torch.cuda.memory_allocated()`` after the step (model
states, no activations) with the plan's ``model states`` and ``EMA`` groups, and
``torch.cuda.max_memory_allocated()`` with the total before overheads. The model-state terms should
agree to within the bucket sizes; the activation terms marked as estimates are what such a run calibrates.

Layout: :mod:`.terms` (the terms and their arithmetic), :mod:`.inventory` (parameter inventories, asked
of the backbone), :mod:`.plan` (the plan of a training config). The activation measurement lives in
``benchmarks/block_saved_bytes.py``: it is measurement, not training.
"""
from __future__ import annotations

from .inventory import ParamInventory, backbone_inventory, param_sizes_by_module
from .plan import largest_teacher_rows, max_text_tokens, plan_from_config, teacher_kind
from .terms import (
    GROUP_ORDER,
    ActivationShape,
    GiB,
    MemoryPlan,
    PlanTerm,
    TeacherKind,
    TermGroup,
    ZeroSettings,
    plan_for_model,
)

__all__ = [
    "GROUP_ORDER", "ActivationShape", "GiB", "MemoryPlan", "ParamInventory", "PlanTerm", "TeacherKind", "TermGroup",
    "ZeroSettings", "backbone_inventory", "largest_teacher_rows", "max_text_tokens", "param_sizes_by_module",
    "plan_for_model", "plan_from_config", "teacher_kind",
]
