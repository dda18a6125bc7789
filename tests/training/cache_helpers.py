"""A small latent/text cache written with the product's CacheWriter (no encoders needed), and the
training config that reads it: for the tests of what a run checks before it starts."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from twinflow.backbones.qwen_image.condition import QwenCondition
from twinflow.data.batch import TrainBatch
from twinflow.data.cache import CacheWriter, data_fingerprint
from twinflow.data.config import DataConfig
from twinflow.data.stats import DataStats, SkipReason

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def write_cache(root: Path, *, channels: int = 4, size: int = 8, text_dim: int = 32, items: int = 8,
                skipped: dict[SkipReason, int] | None = None) -> DataConfig:
    """A cache of ``items`` random items under ``root/cache`` for the folder source ``root/images``;
    ``skipped`` items are recorded as the precompute's skips. Returns the data section it matches."""
    data = DataConfig(source="folder", paths=[str(root / "images")], image_size=64, cache_dir=str(root / "cache"),
                      use_cache=True)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(items, 5, text_dim, generator=gen)
    mask = torch.ones(items, 5, dtype=torch.bool)
    mask[::2, 3:] = False
    batch = TrainBatch(torch.randn(items, channels, size, size, generator=gen), QwenCondition(embeds, mask),
                       QwenCondition(embeds[:, :2], mask[:, :2]), list(range(items)), [f"item{i}" for i in range(items)])
    writer = CacheWriter(data.cache_dir, shard_size=4, dtype="float32")
    writer.add(batch, store_uncond_per_item=False)
    writer.set_unconditional(QwenCondition(embeds[:1, :2], mask[:1, :2]))
    stats = DataStats()
    for reason, n in (skipped or {}).items():
        for i in range(n):
            stats.record(reason, f"bad-{reason.value}-{i}")
    writer.finish({**data_fingerprint(data), "model_path": str(root / "encoders")}, stats)
    return data


def cache_config(root: Path, data: DataConfig, **data_changes) -> Path:
    """``configs/tiny_cpu.yaml`` training on the cache of :func:`write_cache` instead of synthetic data."""
    config = yaml.safe_load(TINY.read_text())
    del config["synthetic_data"]
    config["data"] = {"source": data.source, "paths": list(data.paths), "image_size": data.image_size,
                      "cache_dir": data.cache_dir, "use_cache": True, **data_changes}
    config["train"]["output_dir"] = str(root / "run")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
