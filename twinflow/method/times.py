"""Time sampling (ALGORITHM.md §3.1 and §3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .groups import GroupSplit


@dataclass
class StepTimes:
    """Signed per-row times of one step: ``t`` and ``tt`` as the network sees them."""

    t: torch.Tensor
    tt: torch.Tensor


def sample_base_times(
    batch_size: int, time_dist_ctrl: tuple[float, float, float], consistc_ratio: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t = clamp(Beta(a, b), 0, 1) s``, ``tt = t - u1 cor t``, ``t_min = t - u2 t min(0.05, cor)``.

    Drawn in float32 from the global RNG (the trainer seeds it per rank and checkpoints its state).
    """
    a, b, s = time_dist_ctrl
    if a == 1.0 and b == 1.0:
        base = torch.rand(batch_size, device=device)
    else:
        beta = torch.distributions.Beta(torch.tensor(a, device=device), torch.tensor(b, device=device))
        base = beta.sample((batch_size,))
    t = base.clamp(0.0, 1.0) * s
    u1 = torch.rand(batch_size, device=device)
    u2 = torch.rand(batch_size, device=device)
    tt = t - u1 * consistc_ratio * t
    t_min = t - u2 * t * min(0.05, consistc_ratio)
    return t, tt, t_min


def assign_group_times(
    t: torch.Tensor, tt: torch.Tensor, t_min: torch.Tensor, split: GroupSplit
) -> StepTimes:
    """Per-group times (§3.3): e2e (1, 0); mul tt = t_min; any as drawn; one tt = 0; adv (-t, -t)."""
    t, tt = t.clone(), tt.clone()
    sl = split.slices
    t[sl["e2e"]] = 1.0
    tt[sl["e2e"]] = 0.0
    tt[sl["mul"]] = t_min[sl["mul"]]
    tt[sl["one"]] = 0.0
    t[sl["adv"]] = -t[sl["adv"]]
    tt[sl["adv"]] = t[sl["adv"]]
    return StepTimes(t=t, tt=tt)
