"""Training data for the trainer: the latent/text cache, or synthetic latents for tests and benchmarks.

Both produce :class:`~twinflow.data.batch.TrainBatch` es through a
:class:`~twinflow.data.loader.ResumableLoader`, whose ``state_dict`` (epoch, position per rank) goes into
every checkpoint, so a resumed run continues with exactly the batches the interrupted one would have
seen. Training reads the cache only: encoding images and prompts on the fly would keep the 8B text
encoder in memory on every rank (build the cache with ``python -m twinflow.data.precompute``).

Synthetic data (``synthetic_data`` section): item ``i`` is drawn from a generator seeded with
``(seed, i)``, so any rank can produce any item. Latents are a smooth per-item pattern (a few random
low-frequency waves plus a little noise) so a model can actually fit them; text embeddings are random
with lengths that vary per item, so padding masks are exercised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from twinflow.backbones.registry import backbone_spec
from twinflow.data.batch import TrainBatch
from twinflow.data.loader import ResumableLoader
from twinflow.utils.typed_config import ConfigError


@dataclass
class SyntheticDataConfig:
    """Synthetic latents (``latent_channels`` x ``latent_size``^2) with text embeddings of width
    ``text_dim`` and ``min_text_len`` to ``max_text_len`` tokens; ``edit`` adds reference latents."""

    num_items: int = 64
    latent_channels: int = 4
    latent_size: int = 8
    text_dim: int = 32
    min_text_len: int = 3
    max_text_len: int = 6
    edit: bool = False
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ConfigError(f"config key 'synthetic_data.num_items' must be >= 1, got {self.num_items}")
        for key in ("latent_channels", "text_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'synthetic_data.{key}' must be >= 1, got {getattr(self, key)}")
        if self.latent_size < 2 or self.latent_size % 2:
            raise ConfigError(f"config key 'synthetic_data.latent_size' must be an even number >= 2, got {self.latent_size}")
        if not 1 <= self.min_text_len <= self.max_text_len:
            raise ConfigError(
                "config keys 'synthetic_data.min_text_len' / 'max_text_len' need 1 <= min <= max, got "
                f"{self.min_text_len} / {self.max_text_len}"
            )


@dataclass
class SyntheticItem:
    index: int
    latents: torch.Tensor
    embeds: torch.Tensor
    ref_latents: torch.Tensor | None


def _fields(embeds: torch.Tensor, ref: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A row's condition fields as a cache schema stores them (``embeds`` and, for edit, ``ref_latents``)."""
    return {"embeds": embeds} if ref is None else {"embeds": embeds, "ref_latents": ref}


class SyntheticDataset(torch.utils.data.Dataset):
    """Deterministic synthetic items (see the module docstring); conditions are built by the cache
    schema of backbone ``family`` (default: the registry's default family)."""

    def __init__(self, config: SyntheticDataConfig, family: str | None = None):
        self.config = config
        self._schema = backbone_spec(family).cache_schema
        gen = torch.Generator().manual_seed(config.seed + 7919)
        self._uncond = torch.randn(2, config.text_dim, generator=gen)

    def __len__(self) -> int:
        return self.config.num_items

    def _latents(self, gen: torch.Generator) -> torch.Tensor:
        c, s = self.config.latent_channels, self.config.latent_size
        coords = torch.linspace(0, 2 * math.pi, s)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        freq = torch.randint(1, 3, (c, 2), generator=gen).float()
        phase = torch.rand(c, 1, 1, generator=gen) * 2 * math.pi
        waves = torch.sin(freq[:, 0, None, None] * yy + freq[:, 1, None, None] * xx + phase)
        return waves + 0.05 * torch.randn(c, s, s, generator=gen)

    def __getitem__(self, index: int) -> SyntheticItem:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        length = cfg.min_text_len + index % (cfg.max_text_len - cfg.min_text_len + 1)
        latents = self._latents(gen)
        embeds = torch.randn(length, cfg.text_dim, generator=gen)
        ref = self._latents(gen) if cfg.edit else None
        return SyntheticItem(index, latents, embeds, ref)

    def collate(self, items: list[SyntheticItem]) -> TrainBatch:
        cond = self._schema.collate([_fields(i.embeds, i.ref_latents) for i in items])
        uncond = self._schema.collate([_fields(self._uncond, i.ref_latents) for i in items])
        return TrainBatch(
            latents=torch.stack([i.latents for i in items]),
            cond=cond,
            uncond=uncond,
            indices=[i.index for i in items],
            keys=[f"synthetic-{i.index}" for i in items],
        )


def check_prompts_only_data(use_image_free: bool) -> None:
    """:class:`ConfigError` unless ``method.use_image_free``: data of prompts without images
    (``data.source: prompts``, a prompts-only cache) has placeholder latents that only the image-free
    objective, which trains on the model's own samples, may be given."""
    if not use_image_free:
        raise ConfigError(
            "config key 'data.source' is 'prompts' (a cache of prompts without images, whose latents are "
            "placeholders) but method.use_image_free is false: set method.use_image_free: true to train on "
            "the model's own one-step samples, or give image data"
        )


def build_loader(
    data: Any, synthetic: SyntheticDataConfig | None, micro_batch_size: int, rank: int, world_size: int,
    *, family: str | None = None, image_free: bool = False,
) -> ResumableLoader:
    """The loader of this rank's micro batches, from the cache (``data``, checked against its settings;
    the cache's skipped-item counts are carried into ``loader.stats``) or ``synthetic`` (conditions of
    backbone ``family``). A cache of prompts without images needs ``image_free``
    (``method.use_image_free``): its latents are placeholders."""
    if synthetic is not None:
        dataset = SyntheticDataset(synthetic, family)
        return ResumableLoader(dataset, micro_batch_size, seed=synthetic.seed, shuffle=synthetic.shuffle,
                               rank=rank, world_size=world_size)
    from twinflow.data.cache import CachedDataset, data_fingerprint

    # The cache must have been built from these data settings (TrainConfig.check_inputs checked it before
    # any rank started; checked again here for configs built in code).
    dataset = CachedDataset(data.cache_dir, data_fingerprint(data))
    if dataset.prompts_only:
        check_prompts_only_data(image_free)
    loader = ResumableLoader(dataset, micro_batch_size, seed=data.seed, shuffle=data.shuffle,
                             rank=rank, world_size=world_size, num_workers=data.num_workers)
    loader.stats.carry(dataset.skipped_at_precompute)  # what the precompute skipped stays in the run's counts
    return loader
