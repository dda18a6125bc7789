"""Building the training data stream from a :class:`DataConfig`."""
from __future__ import annotations

from typing import Any

from .cache import CachedDataset
from .config import DataConfig
from .loader import ResumableLoader
from .raw import RawImageTextDataset, build_raw_dataset


def build_dataset(config: DataConfig, expected_fingerprint: dict[str, Any] | None = None) -> CachedDataset | RawImageTextDataset:
    """The cache when ``config.use_cache`` (checked against ``expected_fingerprint``), else the raw data."""
    if config.use_cache:
        assert config.cache_dir is not None  # DataConfig enforces it
        return CachedDataset(config.cache_dir, expected_fingerprint)
    return build_raw_dataset(config)


def build_loader(
    config: DataConfig,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    expected_fingerprint: dict[str, Any] | None = None,
) -> ResumableLoader:
    """This rank's endless batch stream: ``TrainBatch`` es from a cache, ``RawBatch`` es from raw data
    (encode those with :func:`twinflow.data.batch.encode_raw_batch`)."""
    return ResumableLoader(
        build_dataset(config, expected_fingerprint),
        batch_size,
        seed=config.seed,
        shuffle=config.shuffle,
        rank=rank,
        world_size=world_size,
        num_workers=config.num_workers,
    )
