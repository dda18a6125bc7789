"""What a run checks about its inputs before any rank starts, and what it carries from them: the cache
against the config (fingerprint, latent and text shapes) and the cache's skipped-item counts."""
from __future__ import annotations

import json

import pytest

from twinflow.data.stats import SkipReason
from twinflow.training.config import load_train_config
from twinflow.training.data import build_loader
from twinflow.utils.typed_config import ConfigError

from cache_helpers import cache_config, write_cache


def test_a_cache_built_from_other_data_settings_is_refused_naming_the_fields(tmp_path):
    data = write_cache(tmp_path)
    path = cache_config(tmp_path, data)
    config = load_train_config(path, check_inputs=True)  # the matching cache passes
    assert len(build_loader(config.data, None, 4, 0, 1).dataset) == 8
    for overrides, fields in (
        (["data.image_size=512"], "image_size: cache has 64, config has 512"),
        (["data.source=parquet"], "source: cache has 'folder', config has 'parquet'"),
        (["data.cache_dtype=bfloat16"], "cache_dtype: cache has 'float32', config has 'bfloat16'"),
    ):
        with pytest.raises(ConfigError, match=f"config key 'data.cache_dir': .*{fields}"):
            load_train_config(path, overrides, check_inputs=True)
        # The trainer's own loader checks it too (a config built in code skips check_inputs).
        config = load_train_config(path, overrides)
        with pytest.raises(Exception, match=fields):
            build_loader(config.data, None, 4, 0, 1)


def test_cache_latent_and_text_shapes_are_checked_against_the_model(tmp_path):
    path = cache_config(tmp_path, write_cache(tmp_path, channels=3))
    with pytest.raises(ConfigError, match=r"gives 3 latent channels but model.transformer takes 4 \(in_channels 16 / patch_size 2\*\*2\)"):
        load_train_config(path, check_inputs=True)
    other = tmp_path / "other"
    path = cache_config(other, write_cache(other, text_dim=24))
    with pytest.raises(ConfigError, match="text embeddings of width 24 but model.transformer takes 32"):
        load_train_config(path, check_inputs=True)


def test_the_caches_skipped_counts_reach_the_training_logs(tmp_path):
    from twinflow.training.observability import RunLogger

    data = write_cache(tmp_path, skipped={SkipReason.CORRUPT_IMAGE: 3, SkipReason.IMAGE_TOO_LARGE: 2})
    config = load_train_config(cache_config(tmp_path, data), ["train.log_every=1"], check_inputs=True)
    loader = build_loader(config.data, None, 4, 0, 1)
    run = RunLogger(config, rank=0, data_stats=loader.stats, progress=False)
    run.log_step(1, {"loss": 1.0})
    run.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["data/skipped_items"] == 5
    assert record["data/skipped/corrupt_image"] == 3 and record["data/skipped/image_too_large"] == 2


def test_a_pretrained_models_shapes_are_read_from_its_folder(tmp_path):
    from cache_helpers import TINY

    folder = tmp_path / "qwen" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", "patch_size": 2,
                                                    "in_channels": 64, "joint_attention_dim": 32}))
    overrides = ["model.transformer=null", f"model.pretrained={tmp_path / 'qwen'}"]
    config = load_train_config(TINY, overrides)  # no file is read when the config is loaded
    with pytest.raises(ConfigError, match=r"'synthetic_data.latent_channels' gives 4 latent channels but model.pretrained .* takes 16"):
        config.check_inputs()
    load_train_config(TINY, overrides + ["synthetic_data.latent_channels=16"], check_inputs=True)


def _prompts_cache(root, items: int = 6, latent_shape=(4, 8, 8), cache_dtype: str = "bfloat16"):
    """A prompts-only cache (no latents stored) written with the product's CacheWriter, and its data section."""
    import torch

    from twinflow.backbones.qwen_image.condition import QwenCondition
    from twinflow.data.batch import TrainBatch, placeholder_latents
    from twinflow.data.cache import CacheWriter, data_fingerprint
    from twinflow.data.config import DataConfig
    from twinflow.data.stats import DataStats

    data = DataConfig(source="prompts", paths=[str(root / "prompts.txt")], image_size=64, cache_dir=str(root / "cache"),
                      use_cache=True, cache_dtype=cache_dtype)
    gen = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(items, 5, 32, generator=gen), torch.ones(items, 5, dtype=torch.bool)
    batch = TrainBatch(placeholder_latents(items, latent_shape), QwenCondition(embeds, mask),
                       QwenCondition(embeds[:, :2], mask[:, :2]), list(range(items)), [f"p{i}" for i in range(items)])
    writer = CacheWriter(data.cache_dir, shard_size=4, dtype=cache_dtype, prompts_only=True)
    writer.add(batch, store_uncond_per_item=False)
    writer.set_unconditional(QwenCondition(embeds[:1, :2], mask[:1, :2]))
    writer.finish({**data_fingerprint(data), "model_path": str(root / "encoders")}, DataStats())
    return data


def test_a_prompts_only_cache_trains_only_image_free(tmp_path):
    import torch

    data = _prompts_cache(tmp_path)
    path = cache_config(tmp_path, data, cache_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"'data.source' is 'prompts' .* method.use_image_free is false"):
        load_train_config(path, check_inputs=True)
    config = load_train_config(path, ["method.use_image_free=true"], check_inputs=True)  # shapes fit the model
    # The loader refuses it too unless told the objective is image-free (a config built in code).
    with pytest.raises(ConfigError, match="method.use_image_free"):
        build_loader(config.data, None, 4, 0, 1)
    batch = next(iter(build_loader(config.data, None, 4, 0, 1, image_free=True)))
    assert batch.latents.shape == (4, 4, 8, 8) and batch.latents.dtype == torch.bfloat16 and not batch.latents.any()
    assert batch.cond.embeds.dtype == torch.bfloat16
    # A prompts cache's latent shape is checked against the model like any cache's.
    other = tmp_path / "other"
    other.mkdir()
    path = cache_config(other, _prompts_cache(other, latent_shape=(3, 8, 8)), cache_dtype="bfloat16")
    with pytest.raises(ConfigError, match="gives 3 latent channels but model.transformer takes 4"):
        load_train_config(path, ["method.use_image_free=true"], check_inputs=True)
