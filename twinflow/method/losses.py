"""Per-sample losses (ALGORITHM.md §3.10), computed in float32 and reduced over all non-batch dims."""
from __future__ import annotations

import torch

from .config import LossFuncConfig


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def barron_weight(mse: torch.Tensor, alpha: float, c: float) -> torch.Tensor:
    """The detached adaptive weight of ``barron_reweighting`` for per-sample MSE values."""
    if abs(alpha - 2.0) < 1e-5:
        return torch.ones_like(mse)
    r = mse.detach() / (c * c + 1e-8)
    return (r / abs(alpha - 2.0) + 1.0) ** ((alpha - 2.0) / 2.0)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossFuncConfig) -> torch.Tensor:
    """Loss of each row: ``l2`` is the MSE; ``barron_reweighting`` is ``mse * stopgrad(w) / c``."""
    mse = per_sample_mse(pred, target)
    if cfg.type == "l2":
        return mse
    return mse * barron_weight(mse, cfg.alpha, cfg.c) / cfg.c
