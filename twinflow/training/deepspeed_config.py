"""The DeepSpeed JSON config, derived from the typed :class:`TrainConfig` (one source of truth).

Batch sizes, the optimizer, clipping and precision come from the ``optim`` / ``train`` / ``deepspeed``
sections; ``deepspeed.extra`` is merged last, recursively, for tuning knobs this project does not name
(bucket sizes, prefetch, reuse distance, persistence threshold). Keys that the trainer owns are refused
in ``extra`` with an error naming them, so the typed config and the engine can never disagree.

The learning-rate schedule is not a DeepSpeed scheduler: the trainer passes its own
(:mod:`twinflow.training.lr_schedule`) to ``deepspeed.initialize``, which steps it only on applied
optimizer steps (a skipped non-finite step leaves it untouched).

Persistent parameters. ZeRO-3 keeps parameters smaller than ``stage3_param_persistence_threshold``
gathered on every rank. The shard EMA does not need the threshold set to 0: its teacher session
releases every gathered parameter (persistent ones included) on entry and exit, so they are re-gathered
from whichever partition is current (see :mod:`twinflow.method.teachers.zero3`). DeepSpeed's defaults are
therefore kept.
"""
from __future__ import annotations

import copy
from typing import Any

from twinflow.utils.typed_config import ConfigError

from .config import OWNED_KEYS, OWNED_ZERO_KEYS, TrainConfig, check_deepspeed_extra  # noqa: F401 (re-exported)

def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(config: TrainConfig, world_size: int, *, on_cpu: bool) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)`` / ``deepspeed.zero.Init(config_dict_or_path=...)``.

    The optimizer is the one a GPU run uses wherever it can run: with ``offload_optimizer`` DeepSpeed's
    ``DeepSpeedCPUAdam`` (its C++ op builds with gcc on any machine, CPU runs included); without it
    ``FusedAdam`` on CUDA. ``on_cpu`` without offload falls back to DeepSpeed's plain
    ``torch.optim.AdamW`` (``torch_adam``), as FusedAdam needs CUDA. The CPU launcher tests offload the
    optimizer, so they run the GPU optimizer class (its ``step`` is a Python int, not a tensor).
    """
    ds = config.deepspeed
    optim = config.optim
    check_deepspeed_extra(ds.extra)  # the config checked it at load time; configs edited in code too
    micro = config.train.micro_batch_size
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "train_batch_size": micro * optim.gradient_accumulation_steps * world_size,
        "gradient_clipping": max(optim.max_grad_norm, 0.0),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": on_cpu and not ds.offload_optimizer,
                "adam_w_mode": True,
            },
        },
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(base, ds.extra)


def deepspeed_arch_list(value: str | None) -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed's JIT op builder can read it, or None when it needs no change.

    PyTorch accepts architecture-specific entries such as ``9.0a`` (Hopper's wgmma/TMA features) and CUDA
    images for H100/H200 set them. DeepSpeed 0.19.8's builder sorts the list by ``int`` of each dotted
    part and dies with ``invalid literal for int() with base 10: '0a'`` the first time it JIT-builds an
    op, i.e. when FusedAdam is created at ``deepspeed.initialize`` (seen on an H200 with torch 2.11 and
    ``TORCH_CUDA_ARCH_LIST`` from the image). The optimizer ops use no architecture-specific
    instructions, so the suffix is dropped (``9.0a`` -> ``9.0``; ``+PTX`` is kept) and duplicates merged.
    """
    if not value or not value.strip():
        return None
    entries: list[str] = []
    for raw in value.replace(" ", ";").split(";"):
        raw = raw.strip()
        if not raw:
            continue
        arch, plus, ptx = raw.partition("+")
        major, dot, minor = arch.partition(".")
        cleaned = major + dot + minor.rstrip("abcdefghijklmnopqrstuvwxyz") + plus + ptx
        if cleaned not in entries:
            entries.append(cleaned)
    fixed = ";".join(entries)
    return None if fixed == value else fixed


def prepare_jit_environment(environ: dict[str, str] | None = None) -> str | None:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` in ``environ`` (default ``os.environ``) for DeepSpeed's op
    builder before ``deepspeed.initialize``; returns the new value when it changed it."""
    import os

    environ = os.environ if environ is None else environ
    fixed = deepspeed_arch_list(environ.get("TORCH_CUDA_ARCH_LIST"))
    if fixed is not None:
        environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return fixed
