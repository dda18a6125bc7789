"""Image-caption data for Qwen-Image training: raw sources, a latent/text cache and a resumable loader.

Light to import: the text encoder and VAE are only imported by :mod:`twinflow.data.precompute` (and by
whoever encodes raw batches on the fly).
"""
from .batch import RawBatch, TrainBatch, encode_raw_batch
from .cache import CachedDataset, CachedItem, cache_fingerprint, read_manifest
from .config import DataConfig
from .factory import build_dataset, build_loader
from .loader import ResumableLoader, iter_batches_in_order
from .raw import FolderImageTextDataset, ParquetImageTextDataset, RawImageTextDataset, RawSample, build_raw_dataset
from .sampler import ResumableSampler
from .stats import DataError, DataStats, Skipped, SkipReason

__all__ = [
    "CachedDataset",
    "CachedItem",
    "DataConfig",
    "DataError",
    "DataStats",
    "FolderImageTextDataset",
    "ParquetImageTextDataset",
    "RawBatch",
    "RawImageTextDataset",
    "RawSample",
    "ResumableLoader",
    "ResumableSampler",
    "SkipReason",
    "Skipped",
    "TrainBatch",
    "build_dataset",
    "build_loader",
    "build_raw_dataset",
    "cache_fingerprint",
    "encode_raw_batch",
    "iter_batches_in_order",
    "read_manifest",
]
