"""How a backbone combines its two time embeddings (ALGORITHM.md §2.1): :class:`CombineRule`, one constant
per backbone, and the rule's time arithmetic in plain torch (the part of the eager reference that the
rule decides; the embedders themselves are in dual_time_embedding.py).

Every rule has the form

    temb = [E1(tau_1) + x_1] + [E2(tau_2) + x_2] * c

with ``a = t * time_scale`` and ``b = tt * time_scale``; ``tau_1 = |a|`` or ``a``; ``tau_2 = b``, ``b - a``
or ``a - b``; ``c = (t - tt)``, or ``|t - tt|``, divided by ``coefficient_divisor``; and ``x_1``, ``x_2``
optional extra inputs (SD3's pooled-text projections, computed by the caller). ``t`` and ``tt`` are the
times the backbone's transformer receives, in its own units.

A rule is plain values, so a backbone passes one (``twinflow`` imports ``kernels``, never the reverse)
and the Triton kernels turn it into compile-time constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SECOND_INPUTS = ("tt", "tt - t", "t - tt")
"""What the second embedder embeds (before ``time_scale``): the target time or a difference."""


def _float32_exact(x: float) -> bool:
    """Whether ``x`` is a float32 value: the kernels take the rule's scalars as float32 constants."""
    return math.isfinite(x) and torch.tensor(x, dtype=torch.float32).item() == x


@dataclass(frozen=True)
class CombineRule:
    """One backbone's dual-time combine (see the module docstring for the formula).

    ``sinusoid_scale``: the ``scale`` of the embedders' diffusers ``Timesteps`` (the sinusoid of
    ``tau`` is taken of ``(tau * freq) * sinusoid_scale``); the embedders passed with the rule must
    agree. ``round_coefficient``: ``c`` is rounded to the embedding dtype before the combine (Qwen-Image's
    eager model multiplies in that dtype); otherwise the combine runs in the time precision and rounds
    once. ``float64_times``: ``a``, ``b``, ``tau`` and ``c`` in float64 (``tau`` then rounds to float32
    for the sinusoid, as the embedders do); else float32. ``extra_inputs``: the rule adds ``x_1``, ``x_2``.
    """

    name: str
    sinusoid_scale: float = 1.0
    time_scale: float = 1.0
    abs_first: bool = False
    second_input: str = "tt"
    coefficient_abs: bool = False
    coefficient_divisor: float = 1.0
    round_coefficient: bool = False
    float64_times: bool = False
    extra_inputs: bool = False

    def __post_init__(self) -> None:
        if self.second_input not in SECOND_INPUTS:
            raise ValueError(f"rule {self.name!r}: second_input must be one of {SECOND_INPUTS}, "
                             f"got {self.second_input!r}")
        for field in ("sinusoid_scale", "time_scale", "coefficient_divisor"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value == 0 or not _float32_exact(float(value)):
                raise ValueError(f"rule {self.name!r}: {field} must be a non-zero float32 value, got {value!r}")
            object.__setattr__(self, field, float(value))

    def __str__(self) -> str:
        return self.name


QWEN_IMAGE = CombineRule("qwen_image", sinusoid_scale=1000.0, round_coefficient=True)
"""``E1(t) + E2(tt) * (t - tt)``; t in [-1, 1], the sinusoid scales by 1000, ``t - tt`` rounded to the
embedding dtype (Qwen-Image's eager model)."""

SD35 = CombineRule("sd35", coefficient_divisor=1000.0, extra_inputs=True)
"""``E1(T, pooled) + E2(TT, pooled) * (T - TT) / 1000`` on SD3's times ``T = 1000 t``; each embedder adds
its own projection of the pooled text (the extra inputs). float32 combine, one rounding."""

SANA = CombineRule("sana", coefficient_divisor=1000.0)
"""``emb_1(T) + emb_2(TT) * (T - TT) / 1000`` on SANA's times ``T = 1000 t``, for the embedded timestep of
``AdaLayerNormSingle``; its modulation (``linear(silu(emb_i))``, combined with the same coefficient)
is the caller's, from the two embeddings the kernel can return. float32 combine, one rounding."""

Z_IMAGE = CombineRule("z_image", time_scale=1000.0, abs_first=True, second_input="tt - t", coefficient_abs=True,
                      float64_times=True)
"""``E1(|t| s) + E2(tt s - t s) * |t - tt|`` with ``s = t_scale`` (1000; ``dataclasses.replace`` for
another) and float64 time arithmetic and combine, as the reference's Z-Image patch."""

RULES = {rule.name: rule for rule in (QWEN_IMAGE, SD35, SANA, Z_IMAGE)}


def _time_dtype(rule: CombineRule) -> torch.dtype:
    return torch.float64 if rule.float64_times else torch.float32


def embedder_times(t: torch.Tensor, tt: torch.Tensor, rule: CombineRule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_1, tau_2)``, the times the two embedders embed, in the rule's time precision."""
    work = _time_dtype(rule)
    a, b = t.to(work), tt.to(work)
    if rule.time_scale != 1.0:
        a, b = a * rule.time_scale, b * rule.time_scale
    tau_1 = a.abs() if rule.abs_first else a
    tau_2 = {"tt": b, "tt - t": b - a, "t - tt": a - b}[rule.second_input]
    return tau_1, tau_2


def combine_coefficient(t: torch.Tensor, tt: torch.Tensor, rule: CombineRule, dtype: torch.dtype) -> torch.Tensor:
    """The per-row coefficient ``c`` (B,): in ``dtype`` when the rule rounds it, else in the time precision
    (float32 or float64), which is then the precision of the combine."""
    work = _time_dtype(rule)
    c = t.to(work) - tt.to(work)
    if rule.coefficient_abs:
        c = c.abs()
    if rule.coefficient_divisor != 1.0:
        c = c / rule.coefficient_divisor
    return c.to(dtype) if rule.round_coefficient else c


def combine(e1: torch.Tensor, e2: torch.Tensor, coefficient: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``e1 + e2 * c`` as the rule's eager model forms it: in ``dtype`` when ``c`` was rounded to it, else
    in ``c``'s precision with one final rounding to ``dtype``."""
    work = coefficient.dtype
    return (e1.to(work) + e2.to(work) * coefficient[:, None]).to(dtype)
