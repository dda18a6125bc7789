"""Builds the demo's inputs on disk, deterministically and offline.

1. A conditioning model folder in the Qwen-Image hub layout (tiny Qwen2.5-VL text encoder, a tokenizer
   built locally, tiny VAE) written by ``save_tiny_model_folder`` and loaded back through the real
   ``from_pretrained`` path.
2. The shapes dataset as a folder of PNG images with same-stem ``.txt`` captions: the product's own
   ``folder`` data format.
3. The latent/text cache the trainer reads, written with the product's ``CacheWriter``. Text embeddings
   come from the conditioner. Image "latents" come from :func:`pixels_to_latents`, an exact,
   parameter-free codec (the 32x32 RGB image folded 4x4 into 48 channels of 8x8): a VAE would have to be
   trained first, which has no place in a ten-minute CPU demo. The Qwen-Image transformer is unchanged by
   this; it sees a (48, 8, 8) latent exactly as it would see a VAE latent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from twinflow.backbones.qwen_image.encoders import QwenImageConditioner
from twinflow.backbones.qwen_image.tiny_encoders import save_tiny_model_folder
from twinflow.data.batch import TrainBatch
from twinflow.data.cache import MANIFEST_NAME, CacheWriter, data_fingerprint
from twinflow.data.config import DataConfig
from twinflow.data.latent_codec import LatentCodec, pixel_fold_name
from twinflow.data.loader import iter_batches_in_order
from twinflow.data.raw import build_raw_dataset
from twinflow.data.stats import DataStats

from .shapes import ShapesDataset

IMAGE_SIZE = 32
FOLD = 4
LATENT_CODEC = pixel_fold_name(FOLD)
CODEC = LatentCodec.parse(LATENT_CODEC)
DONE_MARKER = "demo_inputs.json"


def pixels_to_latents(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3 F^2, H/F, W/F); exactly inverted by :func:`latents_to_pixels`."""
    return CODEC.encode(pixels)


def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
    return CODEC.decoder()(latents)


@dataclass(frozen=True)
class DemoInputs:
    model_dir: Path
    data_dir: Path
    cache_dir: Path


def write_dataset_folder(folder: Path, dataset: ShapesDataset) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(dataset)), desc="writing shapes dataset", leave=False):
        image, caption = dataset[i]
        Image.fromarray(image).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(caption)


def build_cache(model_dir: Path, data_dir: Path, cache_dir: Path, image_size: int, batch_size: int = 64) -> None:
    conditioner = QwenImageConditioner.from_pretrained(
        model_dir, text_encoder_dtype=torch.float32, vae_dtype=torch.float32
    )
    data = DataConfig(source="folder", paths=[str(data_dir)], image_size=image_size, shuffle=False)
    dataset = build_raw_dataset(data)
    stats = DataStats()
    writer = CacheWriter(cache_dir, shard_size=1024, dtype="float32")
    with torch.no_grad():
        for raw in tqdm(iter_batches_in_order(dataset, batch_size, stats), desc="encoding captions", leave=False):
            cond, uncond = conditioner.encode_pair(raw.captions)
            batch = TrainBatch(pixels_to_latents(raw.pixels), cond, uncond, raw.indices, raw.keys)
            writer.add(batch, store_uncond_per_item=False)
        writer.set_unconditional(conditioner.encode_unconditional(1))
    # The data settings as the trainer checks them (data_fingerprint), plus what the demo's codec adds.
    fingerprint = {
        **data_fingerprint(data),
        "dataset": "twinflow.demo.shapes",
        "model_path": str(model_dir.resolve()),
        "latent_codec": LATENT_CODEC,
        "negative_prompt": conditioner.negative_prompt,
    }
    writer.finish(fingerprint, stats)


def prepare_inputs(root: Path, num_items: int, image_size: int, seed: int = 0) -> DemoInputs:
    """Create (or reuse, when a previous run completed them with the same settings) the demo inputs."""
    root = Path(root)
    inputs = DemoInputs(root / "models" / "conditioner", root / "data" / "shapes", root / "data" / "cache")
    settings = {"num_items": num_items, "image_size": image_size, "seed": seed, "latent_codec": LATENT_CODEC,
                "cache_fingerprint": 2}  # 2: the fingerprint holds the data settings the trainer checks
    marker = root / "data" / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings and (inputs.cache_dir / MANIFEST_NAME).is_file():
        return inputs
    save_tiny_model_folder(inputs.model_dir, seed=seed)
    write_dataset_folder(inputs.data_dir, ShapesDataset(length=num_items, size=image_size, seed=seed))
    build_cache(inputs.model_dir, inputs.data_dir, inputs.cache_dir, image_size)
    marker.write_text(json.dumps(settings))
    return inputs
