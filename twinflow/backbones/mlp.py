"""A small dual-time MLP backbone for low-dimensional data (tests, toy experiments).

It implements the backbone protocol ``F(x_t, t, tt, cond)`` with the same dual-time conditioning as the
Qwen-Image wrapper: ``temb = E1(t) + E2(tt) (t - tt)``, ``E2`` initialised as a copy of ``E1``, so with
``t == tt`` it is the plain one-time model. ``cond`` is an optional class index per row; index
``num_classes`` is the unconditional ("null") class.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def sinusoid(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Cos-first sinusoidal features of ``scale * t``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, width: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.net = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(sinusoid(t, self.freq_dim))


class DualTimeMLP(nn.Module):
    def __init__(self, data_dim: int = 2, width: int = 128, depth: int = 3, num_classes: Optional[int] = None):
        super().__init__()
        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(width)
        self.time_embed_2 = TimeEmbedding(width)
        self.time_embed_2.load_state_dict(self.time_embed.state_dict())
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(data_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, data_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Optional[torch.Tensor] = None):
        if x.dim() != 2:
            raise ValueError(f"DualTimeMLP expects x of shape (B, D), got {tuple(x.shape)}")
        emb = self.time_embed(t) + self.time_embed_2(tt) * (t - tt).float()[:, None]
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embed(cond)
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
