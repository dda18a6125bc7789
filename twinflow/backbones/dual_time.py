"""Shared by the dual-time subclasses of diffusers transformers (ALGORITHM.md §2.1): forwarding the
parent's constructor arguments, and initialising and loading the second time embedder ``E2``.

Each dual-time transformer adds one embedder module to its diffusers parent. A plain (non-TwinFlow)
checkpoint lacks it, so ``from_pretrained`` must initialise it after loading; a TwinFlow checkpoint
holds it whole. The initialisations differ per backbone (a copy of ``E1``, or normal(0, 0.02) weights
with zero biases), the loading rule does not. All writes work on ZeRO-3 partitioned parameters too
(gathered with rank 0's values broadcast) and on the meta device, where diffusers' low-memory loading
leaves the weights a checkpoint does not hold.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from twinflow.utils.partitioned import gathered

logger = logging.getLogger(__name__)


def check_target_timestep(timestep: torch.Tensor | None, target_timestep: torch.Tensor) -> None:
    """The target time must come with a current time of the same shape (one per row)."""
    if timestep is None or target_timestep.shape != timestep.shape:
        shape = None if timestep is None else tuple(timestep.shape)
        raise ValueError(f"target_timestep shape {tuple(target_timestep.shape)} must equal the timestep's shape {shape}")


def parent_arguments(parent: type, arguments: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``arguments`` (a subclass constructor's ``locals()``) that ``parent.__init__``
    takes: the subclass keeps the parent's signature (for ``register_to_config``) and forwards it whole."""
    names = list(inspect.signature(parent.__init__).parameters)[1:]
    return {name: arguments[name] for name in names if name in arguments}


def _assign(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """``module``'s parameters <- ``values`` (materialising meta parameters, writing into gathered ones)."""
    params = dict(module.named_parameters())
    meta = [name for name, p in params.items() if p.is_meta]
    if meta:
        module.load_state_dict(values, assign=True, strict=True)
        return
    with gathered(params.values(), modify=True), torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def copy_module_(src: nn.Module, dst: nn.Module) -> None:
    """``dst``'s parameters <- ``src``'s (same structure)."""
    src_params = dict(src.named_parameters())
    with gathered(src_params.values()):
        values = {name: p.detach().clone() for name, p in src_params.items()}
    _assign(dst, values)


def normal_init_linears_(module: nn.Module, std: float = 0.02) -> None:
    """Every ``nn.Linear`` in ``module``: weight ~ normal(0, ``std``) from the global RNG, bias = 0."""
    values = {}
    for prefix, linear in module.named_modules():
        if isinstance(linear, nn.Linear):
            dot = f"{prefix}." if prefix else ""
            shape, dtype = getattr(linear.weight, "ds_shape", linear.weight.shape), linear.weight.dtype
            values[dot + "weight"] = torch.empty(shape, dtype=torch.float32).normal_(0.0, std).to(dtype)
            if linear.bias is not None:
                values[dot + "bias"] = torch.zeros(getattr(linear.bias, "ds_shape", linear.bias.shape), dtype=dtype)
    names = {name for name, _ in module.named_parameters()}
    if names != set(values):
        raise ValueError(f"normal_init_linears_: parameters outside nn.Linear layers: {sorted(names - set(values))}")
    _assign(module, values)


def load_with_twin_embedder(
    load: Callable[..., Any], source: Any, kwargs: dict[str, Any], *, prefix: str, fill: Callable[[nn.Module], None]
) -> Any:
    """diffusers' ``from_pretrained`` (``load``) with the second embedder completed.

    If the checkpoint lacked every key under ``prefix`` (a plain checkpoint), ``fill(model)`` initialises
    the embedder and those keys leave ``missing_keys``. A checkpoint holding only some of them is an error
    (a corrupt or foreign file, not something to paper over). A model built without the embedder
    (single-embedder mode) is returned as loaded. ``output_loading_info`` works as in diffusers.
    """
    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(source, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    name = prefix.rstrip(".")
    if missing and hasattr(model, name):
        expected = sorted(prefix + k for k in model.get_submodule(name).state_dict())
        if missing != expected:
            raise ValueError(f"checkpoint {source} holds only part of {name}: missing {missing}")
        fill(model)
        logger.info("%s has no %s: initialised it (%s)", source, name, type(model).__name__)
        info["missing_keys"] = [k for k in info["missing_keys"] if not k.startswith(prefix)]
    return (model, info) if want_info else model


KERNEL_CHOICES = ("eager", "triton")


class FusedTimeEmbedding:
    """The ``kernels`` choice of a dual-time transformer whose embedders the fused kernel reads
    (``twinflow.kernels.dual_time_embedding``): ``"eager"`` runs the model's own combine, ``"triton"``
    the kernel under :meth:`fused_rule`. A mixin for SD3.5 and Z-Image; Qwen-Image keeps its own (its
    choice is a config key).

    Not a ``config.json`` key (``ignore_for_config``): the saved and exported configuration stays the
    one without it, and a builder sets the choice with :meth:`use_kernels` after loading.
    """

    ignore_for_config = ["kernels"]
    embedder_names: tuple[str, str]
    """The attribute names of ``E1`` and ``E2``."""

    def fused_rule(self) -> Any:
        raise NotImplementedError

    def use_kernels(self, kernels: str) -> None:
        """Select ``"eager"`` or ``"triton"`` (binds the fused module over the current embedders)."""
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.kernels = kernels
        if kernels == "triton" and getattr(self, self.embedder_names[1], None) is not None:
            self.bind_fused_time_embedding()
        elif getattr(self, "fused_time_embed", None) is not None:
            del self.fused_time_embed

    def bind_fused_time_embedding(self) -> None:
        """(Re)create the fused module over the *current* embedders, as Qwen-Image's transformer does
        (a submodule, so ZeRO-3 gathers the weights it reads; the shared ``add_lora`` calls this again
        after peft). The import is lazy: Triton's interpreter mode must be chosen before it."""
        from twinflow.kernels.dual_time_embedding import DualTimestepEmbedding

        first, second = (getattr(self, name) for name in self.embedder_names)
        self.fused_time_embed = DualTimestepEmbedding(first, second, backend="triton", rule=self.fused_rule())


def check_fused_lora(spec: Any, config: Any, embedder_linears: tuple[str, ...]) -> None:
    """``kernels: triton`` reads the embedders' Linear weights directly, so LoRA must not wrap them: a
    ``ConfigError`` naming the keys when ``spec.lora_targets(config)`` (peft suffix patterns; asked only
    then, it imports peft) match one of ``embedder_linears``. Checked with the other model checks, after the top-level ``kernels`` (``auto``
    included) has set ``model.kernels``."""
    from twinflow.utils.typed_config import ConfigError

    if config.kernels != "triton" or not config.lora.enabled:
        return
    targets = spec.lora_targets(config)
    wrapped = [name for name in embedder_linears if any(name == t or name.endswith("." + t) for t in targets)]
    if wrapped:
        raise ConfigError(f"config keys 'kernels: triton' and 'model.lora' conflict: LoRA adapts {wrapped}, whose "
                          "weights the fused time embedding reads directly; set kernels: eager, or leave the time "
                          "embedders out of lora.target_modules (and lora.train_time_embed_2 not 'lora')")
