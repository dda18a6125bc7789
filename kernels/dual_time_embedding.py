"""Fused dual-timestep embedding for TwinFlow's Qwen-Image (ALGORITHM.md §2).

    temb = E1(t) + E2(tt) * (t - tt),   E(tau) = Linear2(SiLU(Linear1(sinusoid(tau))))

``sinusoid`` is diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``
(cos half first) and each ``E`` is the ``timestep_embedder`` of a ``QwenTimestepProjEmbeddings``.

Three pieces live here:

* :func:`dual_time_embedding_reference`: plain torch ops that reproduce diffusers bit for bit (same
  frequency table, same order of float32 operations, same casts), plus the combine. It is the
  executable specification the kernels are tested against.
* :func:`dual_time_embedding_triton`, the same with Triton kernels, three launches forward and three
  backward (the kernels, launches and autograd Function are in dual_time_embedding_triton.py).
* :class:`DualTimestepEmbedding`, a drop-in module reading the weights of two diffusers embedders
  that it does not own (state-dict keys stay ``time_text_embed.*`` / ``time_text_embed_2.*``).

Numerics. Everything accumulates in float32. The kernels round to the compute dtype where the eager
module boundaries round (sinusoid, Linear1 output, SiLU output, each Linear2 output, ``t - tt``), then
combine in float32 with a single final rounding. The sinusoid uses the frequency table computed by
torch exactly as diffusers computes it, and ``(t * freq) * 1000`` in float32 as diffusers does; sin and
cos come from libdevice on CUDA (the CUDA math library torch also uses; Triton links it flush-to-zero,
which can only matter for denormal arguments, |t| < 1e-34) and from numpy under the CPU interpreter,
which differ from torch's CPU sin/cos by 1 ulp at most over 40k times in [-1, 1] (the tests allow 2:
each library is documented within 1 ulp of the exact value).

Gradients: for the weights and biases of both embedders. ``t`` and ``tt`` are data (sampled times);
the Triton path rejects them when they require grad instead of silently returning no gradient.
"""
from __future__ import annotations

import functools
import math
import operator
import weakref
from typing import Optional

import torch
from torch import nn

from ._common import BACKENDS, KernelBackendError, use_triton
from .dual_time_embedding_triton import SINUSOID_SCALE, Weights, embed, launch_sinusoid

# The diffusers Timesteps configuration used by QwenTimestepProjEmbeddings (and SINUSOID_SCALE).
SINUSOID_MAX_PERIOD = 10000
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------

def _frequencies(half: int, device: torch.device) -> torch.Tensor:
    """``exp(-ln(max_period) * i / half)`` for i < half, with the same float32 torch ops (and therefore
    the same exp implementation on this device) as diffusers' ``get_timestep_embedding`` with
    ``downscale_freq_shift=0``."""
    exponent = -math.log(SINUSOID_MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32, device=device)
    return torch.exp(exponent / half)


@functools.lru_cache(maxsize=16)
def _frequency_table(half: int, device: torch.device) -> torch.Tensor:
    """:func:`_frequencies` cached for kernel launches (a constant per device). Built outside inference
    mode, so a first call from a sampler does not cache a tensor autograd may refuse later. The eager
    reference recomputes it instead, as diffusers does, which keeps it free of caches for
    ``torch.compile``."""
    with torch.inference_mode(False):
        return _frequencies(half, device)


def timestep_sinusoid(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Diffusers' ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``,
    bit for bit: float32 ``(t * freq) * 1000``, then ``[cos, sin]``. Returns float32 ``(B, channels)``."""
    args = t[:, None].float() * _frequencies(channels // 2, t.device)[None, :]
    args = SINUSOID_SCALE * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed_reference(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ``QwenTimestepProjEmbeddings`` forward: sinusoid cast to ``dtype``, Linear, SiLU, Linear."""
    proj = timestep_sinusoid(t, w1.shape[1]).to(dtype)
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(proj, w1, b1)), w2, b2)


def dual_time_embedding_reference(t: torch.Tensor, tt: torch.Tensor,
                                  w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                                  w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                                  dtype: torch.dtype) -> torch.Tensor:
    """``E1(t) + E2(tt) * (t - tt)`` with plain torch ops; ``E1`` and ``E2`` equal diffusers' modules
    exactly. ``(t - tt)`` is taken in float32 and cast to ``dtype``, so rows with ``t == tt`` return
    ``E1(t)`` exactly. Returns ``(B, D)`` in ``dtype``."""
    _validate(t, tt, (w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2), dtype)
    e1 = _embed_reference(t, w1_1, b1_1, w2_1, b2_1, dtype)
    e2 = _embed_reference(tt, w1_2, b1_2, w2_2, b2_2, dtype)
    delta = (t.float() - tt.float()).to(dtype)
    return e1 + e2 * delta[:, None]


_WEIGHT_NAMES = Weights._fields


def _validate_times(t: torch.Tensor, tt: torch.Tensor) -> None:
    for name, x in (("t", t), ("tt", tt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of times, got shape {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if t.shape != tt.shape or t.numel() == 0:
        raise ValueError(f"t and tt must have the same non-empty shape, got {tuple(t.shape)} and {tuple(tt.shape)}")


def _validate(t: torch.Tensor, tt: torch.Tensor, weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """Clear errors for bad shapes, dtypes and devices (shared by both backends)."""
    _validate_times(t, tt)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if any(w is None for w in weights):
        missing = [n for n, w in zip(_WEIGHT_NAMES, weights) if w is None]
        raise ValueError(f"the timestep embedders must have biases; missing: {missing}")
    w1 = weights[0]
    if w1.dim() != 2 or w1.shape[1] % 2:
        raise ValueError(f"w1_1 must be (D, C) with an even sinusoid width C, got {tuple(w1.shape)}")
    d, c = w1.shape
    expected = ((d, c), (d,), (d, d), (d,)) * 2
    for name, w, shape in zip(_WEIGHT_NAMES, weights, expected):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {shape} (D={d}, C={c})")
        if w.dtype != dtype:
            raise ValueError(f"{name} is {w.dtype} but the embedding dtype is {dtype}; cast the embedder")
        if w.device != t.device or tt.device != t.device:
            raise ValueError(f"{name} is on {w.device}, t on {t.device}, tt on {tt.device}: use one device")


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_validated: list = [None]
"""The fingerprint of the last weights :func:`_validate_cached` accepted (one slot: a model has one
pair of embedders)."""


def _validate_cached(t: torch.Tensor, tt: torch.Tensor, weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """:func:`_validate`, with the weight checks skipped when the weights have the fingerprint (shapes,
    dtypes, devices, plus ``dtype`` and the times' device) that passed last time;
    the times are checked on every call. Everything ``_validate`` checks about a weight is a function
    of its fingerprint, so a skipped check would have passed."""
    try:
        key = (dtype, t.device, tuple(map(_SHAPE, weights)), tuple(map(_DTYPE, weights)),
               tuple(map(_DEVICE, weights)))
    except TypeError:  # a missing bias (None): the full check names it
        key = None
    if key is not None and key == _validated[0]:
        _validate_times(t, tt)
        if tt.device != t.device:
            raise ValueError(f"t is on {t.device} but tt is on {tt.device}: use one device")
        return
    _validate(t, tt, weights, dtype)
    _validated[0] = key


# --------------------------------------------------------------------------------------------------
# Triton entry points (the kernels, launches and autograd Function: dual_time_embedding_triton.py)
# --------------------------------------------------------------------------------------------------

def timestep_sinusoid_pair_triton(t: torch.Tensor, tt: torch.Tensor, channels: int = 256,
                                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sinusoid kernel alone: ``stack([timestep_sinusoid(t), timestep_sinusoid(tt)]).to(dtype)``,
    shape (2, B, channels), from one launch (used by the forward; exposed to test it in isolation)."""
    if t.dim() != 1 or t.shape != tt.shape or t.numel() == 0 or channels <= 0 or channels % 2:
        raise ValueError(f"need 1-D t, tt of one non-empty shape and an even channel count; got "
                         f"{tuple(t.shape)}, {tuple(tt.shape)}, channels={channels}")
    use_triton(t, tt, backend="triton")
    if t.dtype != tt.dtype:
        t, tt = t.float(), tt.float()
    proj = torch.empty((2, t.shape[0], channels), dtype=dtype, device=t.device)
    launch_sinusoid(t, tt, frequencies=_frequency_table(channels // 2, t.device), proj=proj)
    return proj


def dual_time_embedding_triton(t: torch.Tensor, tt: torch.Tensor,
                               w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                               w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                               dtype: torch.dtype) -> torch.Tensor:
    """The Triton path with the reference's signature (differentiable in the 8 weight tensors)."""
    weights = Weights(w1_1=w1_1, b1_1=b1_1, w2_1=w2_1, b2_1=b2_1, w1_2=w1_2, b1_2=b1_2, w2_2=w2_2, b2_2=b2_2)
    _validate_cached(t, tt, weights, dtype)
    use_triton(t, tt, backend="triton")  # raises a KernelBackendError when it cannot run
    if dtype not in _KERNEL_DTYPES:
        raise KernelBackendError(f"the Triton dual-time embedding supports {_KERNEL_DTYPES}, got {dtype}")
    if t.requires_grad or tt.requires_grad:
        raise KernelBackendError("the Triton dual-time embedding gives no gradient for t / tt; "
                                 "pass detached times or use backend='eager'")
    if t.dtype != tt.dtype:  # one load type in the kernel; exact, since both paths take .float()
        t, tt = t.float(), tt.float()
    return embed(t, tt, frequencies=_frequency_table(w1_1.shape[1] // 2, t.device), dtype=dtype, weights=weights)



# --------------------------------------------------------------------------------------------------
# Module-level API
# --------------------------------------------------------------------------------------------------

def embedder_weights(embed: nn.Module, name: str = "embedder") -> tuple[torch.Tensor, ...]:
    """``(w1, b1, w2, b2)`` of a ``QwenTimestepProjEmbeddings``, after checking that it is the
    configuration the fused path implements (clear error naming ``name`` otherwise). Only the timestep
    part is read: an ``addition_t_embedding`` (``use_additional_t_cond``) is the caller's to add."""
    proj = getattr(embed, "time_proj", None)
    emb = getattr(embed, "timestep_embedder", None)
    if proj is None or emb is None:
        raise TypeError(f"{name} must be a QwenTimestepProjEmbeddings (time_proj + timestep_embedder), "
                        f"got {type(embed).__name__}")
    lin1, lin2 = getattr(emb, "linear_1", None), getattr(emb, "linear_2", None)
    for lname, lin in (("linear_1", lin1), ("linear_2", lin2)):
        if not isinstance(lin, nn.Linear) or hasattr(lin, "base_layer"):
            raise TypeError(f"{name}.timestep_embedder.{lname} is {type(lin).__name__}, not a plain nn.Linear "
                            "(e.g. wrapped by LoRA); the fused embedding reads its weight directly: "
                            "use the plain diffusers modules (kernels: eager) instead")
    act = getattr(emb, "act", None)
    if not isinstance(act, nn.SiLU) or getattr(emb, "cond_proj", None) is not None \
            or getattr(emb, "post_act", None) is not None:
        raise ValueError(f"{name}.timestep_embedder must be Linear -> SiLU -> Linear without cond_proj/post_act")
    config = (proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale)
    if config != (lin1.in_features, True, 0, SINUSOID_SCALE) or proj.num_channels % 2:
        raise ValueError(f"{name}.time_proj is Timesteps{config} (channels, flip_sin_to_cos, shift, scale); "
                         f"expected ({lin1.in_features}, True, 0, {SINUSOID_SCALE:g})")
    return lin1.weight, lin1.bias, lin2.weight, lin2.bias


_checked_embedders: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure(embed: nn.Module) -> Optional[tuple]:
    """The objects :func:`embedder_weights` inspects, read from the modules' registries (dict look-ups,
    ~1 us): any replaced submodule or parameter gives a different tuple. None when one is missing."""
    try:
        proj, emb = embed._modules["time_proj"], embed._modules["timestep_embedder"]
        sub = emb._modules
        lin1, lin2 = sub["linear_1"], sub["linear_2"]
        return (proj, emb, lin1, lin2, sub.get("act"), sub.get("cond_proj"), sub.get("post_act"),
                proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale,
                *lin1._parameters.values(), *lin2._parameters.values())
    except (AttributeError, KeyError, TypeError):
        return None


def _embedder_weights_cached(embed: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """:func:`embedder_weights`, checked once per embedder and again whenever one of the objects it
    inspects (submodules, parameters, Timesteps configuration) was replaced. The cache holds the
    embedder weakly; the objects are compared by identity (the cached tuple keeps them alive, so an
    ``is`` match is never a recycled object)."""
    structure = _structure(embed)
    cached = _checked_embedders.get(embed) if structure is not None else None
    if cached is not None and len(cached[0]) == len(structure) and all(map(operator.is_, cached[0], structure)):
        return cached[1]
    weights = embedder_weights(embed, name)
    if structure is not None:
        _checked_embedders[embed] = (structure, weights)
    return weights


def dual_time_embedding(t: torch.Tensor, tt: torch.Tensor, embed_1: nn.Module, embed_2: nn.Module,
                        dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """``E1(t) + E2(tt) * (t - tt)`` from two ``QwenTimestepProjEmbeddings`` (``backend``: "triton",
    "eager" or "auto", see ``twinflow.kernels._common``). Reads the weights directly: under ZeRO-3 use
    :class:`DualTimestepEmbedding`, which makes DeepSpeed gather them."""
    weights = _embedder_weights_cached(embed_1, "embed_1") + _embedder_weights_cached(embed_2, "embed_2")
    if backend == "triton" or (use_triton(t, tt, *weights, backend=backend) and dtype in _KERNEL_DTYPES
                               and not (t.requires_grad or tt.requires_grad)):
        return dual_time_embedding_triton(t, tt, *weights, dtype=dtype)
    return dual_time_embedding_reference(t, tt, *weights, dtype=dtype)


class DualTimestepEmbedding(nn.Module):
    """Drop-in ``E1(t) + E2(tt) * (t - tt)`` over two diffusers embedders it does not own.

    The embedders are kept in a tuple, not as submodules, so they add no parameters and no state-dict
    keys here: the model's keys stay ``time_text_embed.*`` and ``time_text_embed_2.*``.

    DeepSpeed ZeRO-3: a partitioned parameter is gathered only when the forward hook of a module that
    owns or has *registered* it fires, and this module bypasses the embedders' own forwards. So every
    embedder parameter that is partitioned (has ``ds_id``) is registered with
    ``deepspeed.zero.register_external_parameter(self, p)``, at construction and again, for parameters
    partitioned later (``deepspeed.initialize`` converting a model built outside ``zero.Init``), in a
    forward pre-hook that runs before DeepSpeed's own (hooks run in registration order). For the hooks
    to exist at all, this module must be a submodule of the model given to ``deepspeed.initialize``;
    if a weight still arrives partitioned, forward raises instead of reading an empty tensor.
    """

    def __init__(self, embed_1: nn.Module, embed_2: nn.Module, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        embedder_weights(embed_1, "embed_1")
        embedder_weights(embed_2, "embed_2")
        self.backend = backend
        self._embedders = (embed_1, embed_2)
        self._register_partitioned_parameters()
        self.register_forward_pre_hook(DualTimestepEmbedding._pre_forward)

    @staticmethod
    def _pre_forward(module: "DualTimestepEmbedding", args: tuple) -> None:
        module._register_partitioned_parameters()

    def _parameters_read(self) -> tuple[nn.Parameter, ...]:
        """The 8 weights and biases the forward reads (cheap: see :func:`_embedder_weights_cached`)."""
        embed_1, embed_2 = self._embedders
        return _embedder_weights_cached(embed_1, "embed_1") + _embedder_weights_cached(embed_2, "embed_2")

    def _register_partitioned_parameters(self) -> None:
        """Register ZeRO-3 partitioned embedder weights as external parameters of this module."""
        partitioned = [p for p in self._parameters_read() if hasattr(p, "ds_id")]
        registered = getattr(self, "_external_params", {})
        missing = [p for p in partitioned if id(p) not in registered]
        if missing:
            import deepspeed  # only reached when DeepSpeed has already partitioned the parameters

            for p in missing:
                deepspeed.zero.register_external_parameter(self, p)

    def _check_gathered(self) -> None:
        for p in self._parameters_read():
            if hasattr(p, "ds_id"):
                from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

                if p.ds_status != ZeroParamStatus.AVAILABLE:
                    raise RuntimeError(
                        f"ZeRO-3 parameter ds_id={p.ds_id} of the timestep embedders is not gathered: "
                        "DualTimestepEmbedding must be a submodule of the model passed to deepspeed.initialize")

    def forward(self, t: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self._check_gathered()
        embed_1, embed_2 = self._embedders
        return dual_time_embedding(t, tt, embed_1, embed_2, dtype, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
