"""Fused dual-timestep embedding for TwinFlow's backbones (ALGORITHM.md §2 and §2.1).

    temb = [E1(tau_1) + x_1] + [E2(tau_2) + x_2] * c,   E(tau) = Linear2(SiLU(Linear1(sinusoid(tau))))

where the :class:`~.dual_time_rule.CombineRule` of the backbone says what ``tau_1``, ``tau_2`` and ``c``
are and whether the extra inputs ``x_1``, ``x_2`` exist (kernels/dual_time_rule.py). Qwen-Image's rule,
the default everywhere, is ``E1(t) + E2(tt) * (t - tt)``; SD3.5's adds the pooled-text projections,
SANA's is that of ``AdaLayerNormSingle``'s embedded timestep, Z-Image's embeds ``|t| s`` and
``(tt - t) s`` and weighs by ``|t - tt|``. ``sinusoid`` is diffusers' ``Timesteps(256,
flip_sin_to_cos=True, downscale_freq_shift=0, scale=rule.sinusoid_scale)`` (cos half first), which is
also Z-Image's own ``TimestepEmbedder.timestep_embedding`` with scale 1. Each ``E`` is the
Linear-SiLU-Linear of a diffusers ``TimestepEmbedding`` (Qwen-Image, SD3.5, SANA) or of Z-Image's
``TimestepEmbedder.mlp``; Linear1 is (H, C), Linear2 (D, H).

Three pieces live here:

* :func:`dual_time_embedding_reference`: plain torch ops that reproduce diffusers bit for bit (same
  frequency table, same order of float32 operations, same casts), plus the rule's combine as the
  backbone's eager model forms it. It is the executable specification the kernels are tested against.
* :func:`dual_time_embedding_triton`, the same with Triton kernels, three launches forward and three
  backward (the kernels, launches and autograd Function are in dual_time_embedding_triton.py).
* :class:`DualTimestepEmbedding`, a drop-in module reading the weights of two diffusers embedders
  that it does not own (state-dict keys stay ``time_text_embed.*`` / ``time_text_embed_2.*``).

Not fused: SD3.5's pooled-text MLPs (the caller passes their outputs as the extra inputs) and SANA's
modulation ``linear(silu(emb_i))`` (a 6D x D product per embedder, cuBLAS's job; the caller runs it on
the two embeddings ``with_parts=True`` returns and combines with :func:`combine_coefficient`).

Numerics. Everything accumulates in float32. The kernels round to the compute dtype where the eager
module boundaries round (sinusoid, Linear1 output, SiLU output, each Linear2 output, each sum with an
extra input, and ``c`` when the rule rounds it), then combine in float32 with a single final rounding
(Z-Image's eager combine is float64: the kernel's float32 one differs by at most one float32 rounding
before the final one). The time arithmetic of the rule (float32, or float64 for Z-Image) is the
reference's, operation for operation. The sinusoid uses the frequency table computed by torch exactly
as diffusers computes it, and ``(tau * freq) * scale`` in float32 as diffusers does; sin and cos come
from libdevice on CUDA (the CUDA math library torch also uses; Triton links it flush-to-zero, which
can only matter for denormal arguments, |t| < 1e-34) and from numpy under the CPU interpreter, which
differ from torch's CPU sin/cos by 1 ulp at most over 40k times in [-1, 1] (the tests allow 2: each
library is documented within 1 ulp of the exact value).

Gradients: for the weights and biases of both embedders and the extra inputs. ``t`` and ``tt`` are data
(sampled times); the Triton path rejects them when they require grad instead of silently returning no
gradient.
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
from .dual_time_embedding_triton import Weights, embed, launch_sinusoid
from .dual_time_rule import (QWEN_IMAGE, RULES, SANA, SD35, Z_IMAGE, CombineRule, combine, combine_coefficient,
                             embedder_times)

__all__ = ["CombineRule", "QWEN_IMAGE", "SD35", "SANA", "Z_IMAGE", "RULES", "combine_coefficient",
           "dual_time_embedding", "dual_time_embedding_reference", "dual_time_embedding_triton",
           "DualTimestepEmbedding", "embedder_weights", "timestep_sinusoid"]

# The diffusers Timesteps configuration used by every supported embedder.
SINUSOID_MAX_PERIOD = 10000
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
Extra = Optional[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------------

def _frequencies(half: int, device: torch.device) -> torch.Tensor:
    """``exp(-ln(max_period) * i / half)`` for i < half, with the same float32 torch ops (and therefore
    the same exp implementation on this device) as diffusers' ``get_timestep_embedding`` with
    ``downscale_freq_shift=0`` (and Z-Image's ``timestep_embedding``)."""
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


def timestep_sinusoid(t: torch.Tensor, channels: int, scale: float = QWEN_IMAGE.sinusoid_scale) -> torch.Tensor:
    """Diffusers' ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0, scale=scale)``,
    bit for bit: float32 ``(t * freq) * scale``, then ``[cos, sin]``. Returns float32 ``(B, channels)``."""
    args = t[:, None].float() * _frequencies(channels // 2, t.device)[None, :]
    args = scale * args
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed_reference(tau: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """One embedder forward: sinusoid cast to ``dtype``, Linear, SiLU, Linear."""
    proj = timestep_sinusoid(tau, w1.shape[1], scale).to(dtype)
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(proj, w1, b1)), w2, b2)


def dual_time_embedding_reference(t: torch.Tensor, tt: torch.Tensor,
                                  w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                                  w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                                  dtype: torch.dtype, rule: CombineRule = QWEN_IMAGE, extra: Extra = None,
                                  with_parts: bool = False):
    """The rule's ``temb`` with plain torch ops, as the backbone's eager model computes it; ``E1`` and
    ``E2`` equal diffusers' modules exactly. Qwen-Image: ``E1(t) + E2(tt) * (t - tt)``, with ``(t - tt)``
    taken in float32 and cast to ``dtype``. Every rule returns ``E1(tau_1) (+ x_1)`` exactly on rows
    with ``t == tt``. Returns ``(B, D)`` in ``dtype``; with ``with_parts``, ``(temb, parts)`` where
    ``parts`` (2, B, D) stacks both embedders' outputs (extra inputs added)."""
    _validate(t, tt, (w1_1, b1_1, w2_1, b2_1, w1_2, b1_2, w2_2, b2_2), dtype)
    _validate_extra(extra, rule, t.shape[0], w2_1.shape[0], dtype, t.device)
    tau_1, tau_2 = embedder_times(t, tt, rule)
    e1 = _embed_reference(tau_1, w1_1, b1_1, w2_1, b2_1, dtype, rule.sinusoid_scale)
    e2 = _embed_reference(tau_2, w1_2, b1_2, w2_2, b2_2, dtype, rule.sinusoid_scale)
    if extra is not None:
        e1, e2 = e1 + extra[0], e2 + extra[1]
    out = combine(e1, e2, combine_coefficient(t, tt, rule, dtype), dtype)
    return (out, torch.stack([e1, e2])) if with_parts else out


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
    w1, w2 = weights[0], weights[2]
    if w1.dim() != 2 or w1.shape[1] % 2 or w2.dim() != 2:
        raise ValueError(f"w1_1 must be (H, C) with an even sinusoid width C and w2_1 (D, H), got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    (h, c), d = w1.shape, w2.shape[0]
    expected = ((h, c), (h,), (d, h), (d,)) * 2
    for name, w, shape in zip(_WEIGHT_NAMES, weights, expected):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {shape} (D={d}, H={h}, C={c})")
        if w.dtype != dtype:
            raise ValueError(f"{name} is {w.dtype} but the embedding dtype is {dtype}; cast the embedder")
        if w.device != t.device or tt.device != t.device:
            raise ValueError(f"{name} is on {w.device}, t on {t.device}, tt on {tt.device}: use one device")


def _validate_extra(extra: Extra, rule: CombineRule, batch: int, width: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """The extra inputs against the rule: present exactly when it adds them, each (B, D) in ``dtype``."""
    if not isinstance(rule, CombineRule):
        raise TypeError(f"rule must be a CombineRule (e.g. dual_time_embedding.SD35), got {type(rule).__name__}")
    if extra is None:
        if rule.extra_inputs:
            raise ValueError(f"rule {rule} adds an extra input to each embedder (SD3's pooled-text projection): "
                             f"pass extra=(x_1, x_2), each ({batch}, {width})")
        return
    if not rule.extra_inputs:
        raise ValueError(f"rule {rule} has no extra inputs, but extra was given")
    if not isinstance(extra, (tuple, list)) or len(extra) != 2:
        raise ValueError(f"extra must be a pair (x_1, x_2) for rule {rule}, got {type(extra).__name__}")
    for name, x in zip(("x_1", "x_2"), extra):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch, width):
            raise ValueError(f"rule {rule}: extra input {name} has shape {tuple(getattr(x, 'shape', ()))}, "
                             f"expected ({batch}, {width}) (batch, embedding width)")
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"rule {rule}: extra input {name} is {x.dtype} on {x.device}; expected {dtype} on "
                             f"{device}")


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

def _one_time_dtype(t: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One load type in the kernels: both times in their promoted dtype (exact; both paths widen)."""
    if t.dtype != tt.dtype:
        common = torch.promote_types(t.dtype, tt.dtype)
        t, tt = t.to(common), tt.to(common)
    return t, tt


def timestep_sinusoid_pair_triton(t: torch.Tensor, tt: torch.Tensor, channels: int = 256,
                                  dtype: torch.dtype = torch.float32, rule: CombineRule = QWEN_IMAGE) -> torch.Tensor:
    """The sinusoid kernel alone: ``stack([timestep_sinusoid(tau_1), timestep_sinusoid(tau_2)]).to(dtype)``
    for the rule's embedder times (``t`` and ``tt`` for Qwen-Image), shape (2, B, channels), from one
    launch (used by the forward; exposed to test it in isolation)."""
    if t.dim() != 1 or t.shape != tt.shape or t.numel() == 0 or channels <= 0 or channels % 2:
        raise ValueError(f"need 1-D t, tt of one non-empty shape and an even channel count; got "
                         f"{tuple(t.shape)}, {tuple(tt.shape)}, channels={channels}")
    use_triton(t, tt, backend="triton")
    t, tt = _one_time_dtype(t, tt)
    proj = torch.empty((2, t.shape[0], channels), dtype=dtype, device=t.device)
    launch_sinusoid(t, tt, frequencies=_frequency_table(channels // 2, t.device), proj=proj, rule=rule)
    return proj


def dual_time_embedding_triton(t: torch.Tensor, tt: torch.Tensor,
                               w1_1: torch.Tensor, b1_1: torch.Tensor, w2_1: torch.Tensor, b2_1: torch.Tensor,
                               w1_2: torch.Tensor, b1_2: torch.Tensor, w2_2: torch.Tensor, b2_2: torch.Tensor,
                               dtype: torch.dtype, rule: CombineRule = QWEN_IMAGE, extra: Extra = None,
                               with_parts: bool = False):
    """The Triton path with the reference's signature (differentiable in the 8 weight tensors and the
    extra inputs)."""
    weights = Weights(w1_1=w1_1, b1_1=b1_1, w2_1=w2_1, b2_1=b2_1, w1_2=w1_2, b1_2=b1_2, w2_2=w2_2, b2_2=b2_2)
    _validate_cached(t, tt, weights, dtype)
    if rule is not QWEN_IMAGE or extra is not None:
        _validate_extra(extra, rule, t.shape[0], w2_1.shape[0], dtype, t.device)
    use_triton(t, tt, backend="triton")  # raises a KernelBackendError when it cannot run
    if dtype not in _KERNEL_DTYPES:
        raise KernelBackendError(f"the Triton dual-time embedding supports {_KERNEL_DTYPES}, got {dtype}")
    if t.requires_grad or tt.requires_grad:
        raise KernelBackendError("the Triton dual-time embedding gives no gradient for t / tt; "
                                 "pass detached times or use backend='eager'")
    t, tt = _one_time_dtype(t, tt)
    return embed(t, tt, frequencies=_frequency_table(w1_1.shape[1] // 2, t.device), dtype=dtype, weights=weights,
                 rule=rule, extra=extra, with_parts=with_parts)



# --------------------------------------------------------------------------------------------------
# Module-level API
# --------------------------------------------------------------------------------------------------

def _timestep_part(embed: nn.Module) -> nn.Module:
    """The module holding the timestep MLP: ``AdaLayerNormSingle`` (SANA) keeps it in ``.emb``."""
    inner = embed._modules.get("emb") if isinstance(embed, nn.Module) else None
    return inner if inner is not None and "linear" in embed._modules else embed


def _inspect(embed: nn.Module, name: str) -> tuple[tuple[torch.Tensor, ...], float]:
    """``((w1, b1, w2, b2), sinusoid scale)`` of a supported embedder, after checking that it is the
    configuration the fused path implements (clear error naming ``name`` otherwise)."""
    embed = _timestep_part(embed)
    if getattr(embed, "use_additional_conditions", False):
        raise ValueError(f"{name}.emb uses additional conditions (resolution, aspect ratio), which the fused "
                         "embedding does not add; use the plain diffusers modules (kernels: eager)")
    mlp = getattr(embed, "mlp", None)
    if isinstance(mlp, nn.Sequential) and hasattr(embed, "frequency_embedding_size"):  # Z-Image's TimestepEmbedder
        if len(mlp) != 3 or not isinstance(mlp[1], nn.SiLU):
            raise ValueError(f"{name}.mlp must be Linear -> SiLU -> Linear")
        lin1, lin2, where = mlp[0], mlp[2], f"{name}.mlp"
        _check_linears(name, where, (("0", lin1), ("2", lin2)))
        channels = embed.frequency_embedding_size
        if channels != lin1.in_features or channels % 2:
            raise ValueError(f"{name}.frequency_embedding_size is {channels}; expected an even size equal to "
                             f"{where}.0.in_features ({lin1.in_features})")
        return (lin1.weight, lin1.bias, lin2.weight, lin2.bias), 1.0
    proj = getattr(embed, "time_proj", None)
    emb = getattr(embed, "timestep_embedder", None)
    if proj is None or emb is None:
        raise TypeError(f"{name} must be a diffusers timestep embedding (time_proj + timestep_embedder: "
                        f"QwenTimestepProjEmbeddings, CombinedTimestepTextProjEmbeddings, AdaLayerNormSingle) "
                        f"or Z-Image's TimestepEmbedder, got {type(embed).__name__}")
    lin1, lin2 = getattr(emb, "linear_1", None), getattr(emb, "linear_2", None)
    _check_linears(name, f"{name}.timestep_embedder", (("linear_1", lin1), ("linear_2", lin2)))
    act = getattr(emb, "act", None)
    if not isinstance(act, nn.SiLU) or getattr(emb, "cond_proj", None) is not None \
            or getattr(emb, "post_act", None) is not None:
        raise ValueError(f"{name}.timestep_embedder must be Linear -> SiLU -> Linear without cond_proj/post_act")
    config = (proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift)
    if config != (lin1.in_features, True, 0) or proj.num_channels % 2:
        raise ValueError(f"{name}.time_proj is Timesteps{config + (proj.scale,)} (channels, flip_sin_to_cos, "
                         f"shift, scale); expected ({lin1.in_features}, True, 0, scale)")
    return (lin1.weight, lin1.bias, lin2.weight, lin2.bias), float(proj.scale)


def _check_linears(name: str, where: str, linears) -> None:
    for lname, lin in linears:
        if not isinstance(lin, nn.Linear) or hasattr(lin, "base_layer"):
            raise TypeError(f"{where}.{lname} is {type(lin).__name__}, not a plain nn.Linear "
                            "(e.g. wrapped by LoRA); the fused embedding reads its weight directly: "
                            "use the plain diffusers modules (kernels: eager) instead")


def _check_rule(name: str, scale: float, rule: CombineRule) -> None:
    """The embedder's sinusoid against the rule's (a Qwen-Image embedder under SD3.5's rule, say)."""
    if scale != rule.sinusoid_scale:
        raise ValueError(f"{name}'s sinusoid has scale {scale:g} but rule {rule} expects "
                         f"{rule.sinusoid_scale:g} ({name}.time_proj is Timesteps(scale={scale:g})): "
                         "the rule does not belong to this embedder")


def embedder_weights(embed: nn.Module, name: str = "embedder",
                     rule: CombineRule = QWEN_IMAGE) -> tuple[torch.Tensor, ...]:
    """``(w1, b1, w2, b2)`` of a ``QwenTimestepProjEmbeddings``, ``CombinedTimestepTextProjEmbeddings``
    (SD3), ``AdaLayerNormSingle`` (SANA) or Z-Image ``TimestepEmbedder``, after checking that it is the
    configuration the fused path implements and that its sinusoid is the rule's (clear error naming
    ``name`` otherwise). Only the timestep MLP is read: an ``addition_t_embedding``
    (``use_additional_t_cond``), SD3's text projection and SANA's modulation linear are the caller's."""
    weights, scale = _inspect(embed, name)
    _check_rule(name, scale, rule)
    return weights


_checked_embedders: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure(embed: nn.Module) -> Optional[tuple]:
    """The objects :func:`_inspect` inspects, read from the modules' registries (dict look-ups, ~1 us):
    any replaced submodule or parameter gives a different tuple. None when one is missing."""
    try:
        outer, embed = embed, _timestep_part(embed)
        mods = embed._modules
        if "mlp" in mods:
            mlp = mods["mlp"]
            lin1, lin2 = mlp._modules["0"], mlp._modules["2"]
            return (outer, mlp, *mlp._modules.values(), embed.frequency_embedding_size,
                    *lin1._parameters.values(), *lin2._parameters.values())
        proj, emb = mods["time_proj"], mods["timestep_embedder"]
        sub = emb._modules
        lin1, lin2 = sub["linear_1"], sub["linear_2"]
        return (outer, embed, proj, emb, lin1, lin2, sub.get("act"), sub.get("cond_proj"), sub.get("post_act"),
                getattr(embed, "use_additional_conditions", False),
                proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale,
                *lin1._parameters.values(), *lin2._parameters.values())
    except (AttributeError, KeyError, TypeError):
        return None


def _embedder_weights_cached(embed: nn.Module, name: str, rule: CombineRule) -> tuple[torch.Tensor, ...]:
    """:func:`embedder_weights`, inspected once per embedder and again whenever one of the objects it
    inspects (submodules, parameters, Timesteps configuration) was replaced; the rule's sinusoid is
    compared on every call (one float compare). The cache holds the embedder weakly; the objects are
    compared by identity (the cached tuple keeps them alive, so an ``is`` match is never a recycled
    object)."""
    structure = _structure(embed)
    cached = _checked_embedders.get(embed) if structure is not None else None
    if cached is not None and len(cached[0]) == len(structure) and all(map(operator.is_, cached[0], structure)):
        weights, scale = cached[1]
    else:
        weights, scale = inspected = _inspect(embed, name)
        if structure is not None:
            _checked_embedders[embed] = (structure, inspected)
    if scale != rule.sinusoid_scale:
        _check_rule(name, scale, rule)
    return weights


def dual_time_embedding(t: torch.Tensor, tt: torch.Tensor, embed_1: nn.Module, embed_2: nn.Module,
                        dtype: torch.dtype, backend: str = "auto", rule: CombineRule = QWEN_IMAGE,
                        extra: Extra = None, with_parts: bool = False):
    """The rule's ``temb`` from two embedders (see :func:`embedder_weights`; ``backend``: "triton",
    "eager" or "auto", see ``twinflow.kernels._common``). Reads the weights directly: under ZeRO-3 use
    :class:`DualTimestepEmbedding`, which makes DeepSpeed gather them."""
    weights = _embedder_weights_cached(embed_1, "embed_1", rule) + _embedder_weights_cached(embed_2, "embed_2", rule)
    options = dict(rule=rule, extra=extra, with_parts=with_parts)
    if backend == "triton" or (use_triton(t, tt, *weights, backend=backend) and dtype in _KERNEL_DTYPES
                               and not (t.requires_grad or tt.requires_grad)):
        return dual_time_embedding_triton(t, tt, *weights, dtype=dtype, **options)
    return dual_time_embedding_reference(t, tt, *weights, dtype=dtype, **options)


class DualTimestepEmbedding(nn.Module):
    """Drop-in dual-time embedding under ``rule`` (Qwen-Image's ``E1(t) + E2(tt) * (t - tt)`` by default)
    over two embedders it does not own.

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

    def __init__(self, embed_1: nn.Module, embed_2: nn.Module, backend: str = "auto",
                 rule: CombineRule = QWEN_IMAGE):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(rule, CombineRule):
            raise TypeError(f"rule must be a CombineRule (e.g. dual_time_embedding.SD35), got {type(rule).__name__}")
        embedder_weights(embed_1, "embed_1", rule)
        embedder_weights(embed_2, "embed_2", rule)
        self.backend = backend
        self.rule = rule
        self._embedders = (embed_1, embed_2)
        self._register_partitioned_parameters()
        self.register_forward_pre_hook(DualTimestepEmbedding._pre_forward)

    @staticmethod
    def _pre_forward(module: "DualTimestepEmbedding", args: tuple) -> None:
        module._register_partitioned_parameters()

    def _parameters_read(self) -> tuple[nn.Parameter, ...]:
        """The 8 weights and biases the forward reads (cheap: see :func:`_embedder_weights_cached`)."""
        embed_1, embed_2 = self._embedders
        return (_embedder_weights_cached(embed_1, "embed_1", self.rule)
                + _embedder_weights_cached(embed_2, "embed_2", self.rule))

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

    def forward(self, t: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype, extra: Extra = None,
                with_parts: bool = False):
        """The rule's ``temb``; ``extra``: the rule's extra inputs; ``with_parts``: also return both
        embedders' outputs, see :func:`dual_time_embedding_reference`."""
        self._check_gathered()
        embed_1, embed_2 = self._embedders
        return dual_time_embedding(t, tt, embed_1, embed_2, dtype, self.backend, self.rule, extra, with_parts)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, rule={self.rule.name!r}"
