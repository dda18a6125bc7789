"""Time grid and per-step noise ratio of the unified sampler (ALGORITHM.md §4, items 1-3).

These are pure functions of the sampler settings, kept apart from the sampling loop so that the
configuration can validate a grid when it is built (a bad grid is a configuration error, found when the
config is loaded rather than halfway through sampling) and so that tests can pin exact values.

Time runs from noise (t = 1) to data (t = 0). The grid is first laid out on ``u = 1 - t`` (the
"progress" coordinate), warped with a Kumaraswamy CDF, and ends with an explicit 0 so that the last step
always jumps to clean data.
"""
from __future__ import annotations

import torch


def num_intervals(sampling_steps: int, sampling_order: int) -> int:
    """Number of grid intervals ``n``: a second-order step costs two model calls, so order 2 uses
    ``(S + 1) // 2`` intervals for a budget of ``S`` steps."""
    return (sampling_steps + 1) // 2 if sampling_order == 2 else sampling_steps


def kumaraswamy_warp(u: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """``u -> (1 - (1 - u^a)^b)^c``: a monotone map of [0, 1] onto itself that concentrates steps
    where the user wants them (``[1, 1, 1]`` is the identity)."""
    return (1 - (1 - u**a) ** b) ** c


def time_grid(
    sampling_steps: int,
    sampling_order: int,
    time_dist_ctrl: tuple[float, float, float],
    rfba_gap_steps: tuple[float, float],
) -> torch.Tensor:
    """The decreasing times ``[t_0, ..., t_{n-1}, 0]`` (float64, ``n + 1`` values).

    ``g1 == 0``: ``u = linspace(g0, 1, n + 1)`` without its last point (so the final model call is made
    at ``t = 1 - warp(u_{n-1}) > 0`` and jumps to 0). ``g1 > 0``: ``u = linspace(g0, 1 - g1, n)``, i.e.
    the last call is made at ``t = 1 - warp(1 - g1)``, which few-step models prefer.
    """
    n = num_intervals(sampling_steps, sampling_order)
    g0, g1 = rfba_gap_steps
    if g1 == 0:
        u = torch.linspace(g0, 1.0, n + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, n, dtype=torch.float64)
    u = kumaraswamy_warp(u, *time_dist_ctrl)
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


def noise_ratio(stochast_ratio: float | str, t_cur: float, t_next: float) -> float:
    """The share ``rho_i`` of fresh noise in the re-noised state of one step.

    A number is used as is. ``"SDE"`` gives ``clamp(|t_next - t_cur| * 2 * t_cur / t_next^2, 0, 1)``.
    At ``t_next = 0`` the formula divides by zero; its limit there is 1 (the numerator is positive
    because ``t_cur > t_next``), and the value is irrelevant anyway because the noise term is scaled
    by ``t_next = 0``. Comparing numerator and denominator first also covers a ``t_next`` so small that
    its square underflows to 0: no division by zero, no inf, no NaN.
    """
    if stochast_ratio != "SDE":
        return float(stochast_ratio)
    numerator = abs(t_next - t_cur) * 2.0 * t_cur
    denominator = t_next * t_next
    if numerator >= denominator:
        return 1.0
    return numerator / denominator
