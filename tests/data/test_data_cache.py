"""The latent/text cache: equal to encoding raw data, crash-safe, guarded against stale settings."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from data_helpers import CAPTIONS, image_bytes, write_parquet
from twinflow.backbones.qwen_image.encoders import EncoderConfig
from twinflow.data import (
    CachedDataset,
    DataConfig,
    DataError,
    TrainBatch,
    build_loader,
    build_raw_dataset,
    cache_fingerprint,
    encode_raw_batch,
    read_manifest,
)
from twinflow.data.precompute import PrecomputeConfig, main, precompute_cache

TOL = dict(rtol=1e-5, atol=1e-5)


def _configs(paths: list[Path], cache_dir: Path, tiny_model_dir: Path, variant: str = "t2i", **data_kw):
    source = "parquet" if paths[0].suffix == ".parquet" else "folder"
    data = DataConfig(source=source, paths=[str(p) for p in paths], image_size=32, cache_dir=str(cache_dir), seed=5, **data_kw)
    encoder = EncoderConfig(model_path=str(tiny_model_dir), variant=variant, text_encoder_dtype="float32", vae_dtype="float32")
    return data, encoder


@pytest.fixture(scope="module")
def t2i_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, make_conditioner: Callable):
    """A text-to-image cache of the seven good rows, in two shards (built once for this module)."""
    root = tmp_path_factory.mktemp("t2i_cache")
    rows = [{"caption": c, "image": image_bytes(i, size=(40 + 8 * (i % 3), 36))} for i, c in enumerate(CAPTIONS)]
    parquet = write_parquet(root / "good.parquet", rows)
    data, encoder = _configs([parquet], root / "cache", tiny_model_dir)
    manifest_path, stats = precompute_cache(
        data, encoder, PrecomputeConfig(batch_size=4, shard_size=4, device="cpu"), conditioner=make_conditioner("t2i"), progress=False
    )
    assert manifest_path.name == "manifest.json" and stats.total == 0
    return data, encoder


def _assert_batches_equal(cached: TrainBatch, live: TrainBatch) -> None:
    assert cached.indices == live.indices and cached.keys == live.keys
    torch.testing.assert_close(cached.latents, live.latents, **TOL)
    for c, l in ((cached.cond, live.cond), (cached.uncond, live.uncond)):
        assert torch.equal(c.mask, l.mask)
        torch.testing.assert_close(c.embeds, l.embeds, **TOL)
        if l.ref_latents is None:
            assert c.ref_latents is None
        else:
            torch.testing.assert_close(c.ref_latents, l.ref_latents, **TOL)


def test_batches_from_the_cache_equal_batches_encoded_from_raw_data(t2i_cache, make_conditioner: Callable) -> None:
    data, encoder = t2i_cache
    manifest = read_manifest(data.cache_dir)
    assert manifest["num_items"] == len(CAPTIONS) and [s["num_items"] for s in manifest["shards"]] == [4, 3]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["fingerprint"] == cache_fingerprint(data, encoder)

    cached = iter(build_loader(dataclasses.replace(data, use_cache=True), 3, expected_fingerprint=cache_fingerprint(data, encoder)))
    raw = iter(build_loader(data, 3))
    for _ in range(3):  # 7 items in batches of 3: the third batch spans two epochs; same shuffled order
        _assert_batches_equal(next(cached), encode_raw_batch(make_conditioner("t2i"), next(raw)))


def test_training_from_the_cache_needs_no_encoder(t2i_cache) -> None:
    data, _ = t2i_cache
    script = (
        "import sys\n"
        "from twinflow.data import CachedDataset\n"
        f"ds = CachedDataset({data.cache_dir!r})\n"
        "batch = ds.collate([ds[6], ds[0]])\n"
        "assert batch.latents.shape == (2, 4, 4, 4) and batch.uncond.embeds.shape[0] == 2\n"
        "loaded = [m for m in ('transformers', 'diffusers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_edit_cache_round_trip(tmp_path: Path, tiny_model_dir: Path, make_conditioner: Callable) -> None:
    root = tmp_path / "edit"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(i))
        (root / f"{i}_ref.png").write_bytes(image_bytes(50 + i, size=(32, 48)))
        (root / f"{i}.txt").write_text(CAPTIONS[i])
    data, encoder = _configs([root], tmp_path / "cache", tiny_model_dir, variant="edit", ref_suffix="_ref")
    conditioner = make_conditioner("edit")
    precompute_cache(data, encoder, PrecomputeConfig(batch_size=3, shard_size=2, device="cpu"), conditioner=conditioner, progress=False)
    cache = CachedDataset(data.cache_dir, cache_fingerprint(data, encoder))
    assert [s["num_items"] for s in cache.manifest["shards"]] == [2, 1]
    assert cache.has_reference and cache.uncond_per_item
    order = [2, 0, 1]
    raw = build_raw_dataset(data)
    live = encode_raw_batch(conditioner, raw.collate([raw[i] for i in order]))
    _assert_batches_equal(cache.collate([cache[i] for i in order]), live)
    with pytest.raises(DataError, match="one unconditional condition per item"):
        cache.unconditional(2)


class _CrashOnSecondBatch:
    """A conditioner that fails while encoding its second batch (an interrupted precompute)."""

    def __init__(self, inner) -> None:
        self._inner, self._calls = inner, 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def pixels_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        if self._calls == 2:
            raise RuntimeError("simulated crash")
        return self._inner.pixels_to_latents(images)


def test_interrupted_precompute_leaves_no_manifest_and_a_rerun_completes(
    good_parquet: Path, tmp_path: Path, tiny_model_dir: Path, make_conditioner: Callable
) -> None:
    cache_dir = tmp_path / "cache"
    data, encoder = _configs([good_parquet], cache_dir, tiny_model_dir)
    options = PrecomputeConfig(batch_size=4, shard_size=4, device="cpu")
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute_cache(data, encoder, options, conditioner=_CrashOnSecondBatch(make_conditioner("t2i")), progress=False)
    assert not (cache_dir / "manifest.json").exists()
    assert list(cache_dir.iterdir()) == []  # the first shard was written, then cleaned up
    with pytest.raises(DataError, match="no cache manifest.*did not finish"):
        CachedDataset(cache_dir)

    # Leftovers of a run that was killed outright, and a file that is not the cache's.
    (cache_dir / "shard-0badc0de-00000.safetensors.tmp").write_bytes(b"partial")
    (cache_dir / "shard-0badc0de-00001.safetensors").write_bytes(b"orphan")
    (cache_dir / "notes.txt").write_text("mine")
    precompute_cache(data, encoder, options, conditioner=make_conditioner("t2i"), progress=False)
    cache = CachedDataset(cache_dir, cache_fingerprint(data, encoder))
    assert len(cache) == len(CAPTIONS)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert "notes.txt" in names and not any("0badc0de" in n for n in names)
    first = cache.collate([cache[i] for i in range(len(cache))])

    # A rebuild with other settings that crashes leaves the complete cache as it was.
    smaller = dataclasses.replace(data, image_size=16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute_cache(smaller, encoder, options, conditioner=_CrashOnSecondBatch(make_conditioner("t2i")), progress=False)
    again = CachedDataset(cache_dir, cache_fingerprint(data, encoder))
    _assert_batches_equal(again.collate([again[i] for i in range(len(again))]), first)
    with pytest.raises(DataError, match="image_size: cache has 32, config has 16"):
        CachedDataset(cache_dir, cache_fingerprint(smaller, encoder))


def test_damaged_cache_files_are_reported(t2i_cache, tmp_path: Path) -> None:
    data = dataclasses.replace(t2i_cache[0], cache_dir=str(tmp_path / "copy"))
    shutil.copytree(t2i_cache[0].cache_dir, data.cache_dir)
    manifest = read_manifest(data.cache_dir)
    shard = Path(data.cache_dir) / manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{shard.name} has 100 bytes, the manifest says"):
        CachedDataset(data.cache_dir)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name} listed in .* is missing"):
        CachedDataset(data.cache_dir)
    (Path(data.cache_dir) / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CachedDataset(data.cache_dir)


def test_precompute_command_line(good_parquet: Path, tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    config = {
        "data": {"source": "parquet", "paths": [str(good_parquet)], "image_size": 32, "cache_dir": str(tmp_path / "c")},
        "encoder": {"model_path": str(tiny_model_dir), "text_encoder_dtype": "float32", "vae_dtype": "float32"},
        "precompute": {"batch_size": 8, "device": "cpu"},
        "trainer": {"steps": 10},  # another section of the training config: ignored here
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--no-progress"]) == 0
    assert "cache written" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["num_items"] == len(CAPTIONS)
    assert main(["--config", str(path), "--set", "data.image_sise=64"]) == 2
    assert "'data.image_sise'" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "encoder.variant=edit"]) == 2
    assert "needs reference images" in capsys.readouterr().err
