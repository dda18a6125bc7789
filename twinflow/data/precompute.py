"""Build the latent / text cache: ``python -m twinflow.data.precompute --config train.yaml [--set k=v ...]``.

Reads the ``data``, ``encoder`` and (optional) ``precompute`` sections of the config file, and
``model.family`` (which backbone's ``encoder`` section and encoders; default as in training); other
sections (the trainer's) are ignored, so the training config itself can be passed. Items are encoded in
dataset order; skipped items are counted and reported, and recorded in the manifest. A prompts source
(``data.source: prompts``) is encoded through the text encoders alone: no image is read and the VAE
encodes nothing; the cache records the latent shape of ``data.image_size`` images instead of latents.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from twinflow.backbones.registry import backbone_spec, spec_for_encoder_config
from twinflow.utils.typed_config import ConfigError, apply_overrides, from_dict, load_yaml

from .batch import encode_raw_batch, prompt_latent_shape
from .cache import CacheWriter, cache_fingerprint
from .config import DataConfig
from .loader import iter_batches_in_order
from .raw import build_raw_dataset
from .stats import DataError, DataStats


@dataclass
class PrecomputeConfig:
    """Section ``precompute``: encoding batch size, items per shard file, device for the encoders."""

    batch_size: int = 8
    shard_size: int = 256
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


@dataclass
class PrecomputeJob:
    """The config sections the precompute reads (``encoder``: the backbone's encoder section)."""

    data: DataConfig
    encoder: Any
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)


def precompute_cache(
    data: DataConfig,
    encoder: Any,
    options: PrecomputeConfig | None = None,
    *,
    conditioner: Any = None,
    progress: bool = True,
) -> tuple[Path, DataStats]:
    """Encode every usable item of ``data`` into ``data.cache_dir``; returns (manifest path, skip stats).

    ``conditioner`` may be passed to reuse loaded encoders; it must have been built from ``encoder``
    (the cache's fingerprint is computed from ``encoder``).
    """
    options = options or PrecomputeConfig()
    if not data.cache_dir:
        raise ConfigError("config key 'data.cache_dir' is required to build a cache")
    dataset = build_raw_dataset(data)
    spec = spec_for_encoder_config(encoder)
    edit = spec.encoder_takes_reference(encoder)
    if edit and data.prompts_only:
        raise ConfigError(f"encoder.variant {encoder.variant!r} needs reference images, which data.source: prompts "
                          "does not have; image-free training from prompts is for text-to-image models")
    if edit != dataset.has_reference:
        raise ConfigError(
            f"encoder.variant {encoder.variant!r} "
            + ("needs reference images: set data.ref_image_column (parquet) or data.ref_suffix (folder)" if edit
               else "takes no reference image: unset data.ref_image_column / data.ref_suffix")
        )
    conditioner = spec.conditioner_from_config(encoder, options.device, given=conditioner)
    latent_shape = prompt_latent_shape(conditioner, data.image_size) if data.prompts_only else None
    stats = DataStats()
    stats.update(dataset.scan_stats)
    writer = CacheWriter(data.cache_dir, options.shard_size, data.cache_dtype, prompts_only=data.prompts_only)
    try:
        with tqdm(total=len(dataset), desc="precompute", unit="item", disable=not progress) as bar:
            batches = iter_batches_in_order(
                dataset, options.batch_size, stats, num_workers=data.num_workers, on_item=lambda: bar.update(1)
            )
            for raw in batches:
                writer.add(encode_raw_batch(conditioner, raw, latent_shape=latent_shape), store_uncond_per_item=edit)
        if not edit:
            writer.set_unconditional(conditioner.encode_unconditional(1))
        manifest = writer.finish(cache_fingerprint(data, encoder), stats)
    except BaseException:
        writer.remove_unreferenced()  # this run's partial files; a previous complete cache stays
        raise
    return manifest, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twinflow.data.precompute", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with data / encoder / precompute sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.image_size=256 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        raw = apply_overrides(load_yaml(args.config), args.overrides)
        job = from_dict(PrecomputeJob, {k: raw[k] for k in ("data", "encoder", "precompute") if k in raw})
        family = (raw.get("model") or {}).get("family")
        job.encoder = from_dict(backbone_spec(family).encoder_config_type, job.encoder, prefix="encoder.")
        manifest, stats = precompute_cache(job.data, job.encoder, job.precompute, progress=not args.no_progress)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cache written: {manifest}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
