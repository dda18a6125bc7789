"""Prompts without images (``data.source: prompts``): the source, its cache and image-free training on it,
for every backbone family through its own cache schema and tiny encoders."""
from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from twinflow.backbones.registry import backbone_spec, families
from twinflow.data.cache import CachedDataset, read_manifest
from twinflow.data.config import DataConfig
from twinflow.data.loader import ResumableLoader
from twinflow.data.precompute import PrecomputeConfig, precompute_cache
from twinflow.data.raw import PromptDataset, build_raw_dataset
from twinflow.data.stats import DataError, SkipReason
from twinflow.utils.typed_config import ConfigError, from_dict

IMAGE_SIZE = 32
# Condition tensors cached in float32 against the same float32 encoders run on the same prompts in
# another batch: only the padding of the batch differs, which the encoders mask out, so the results
# differ by float32 rounding of reductions over different lengths (~1e-7 relative for these 32-wide
# models). 1e-5 leaves margin for that; a wrong row or prompt differs by O(1).
TOL = dict(rtol=1e-5, atol=1e-5)


def _write_prompt_files(root: Path) -> dict[str, str]:
    """A .txt and a .parquet file of prompts, with blank ones; returns {key: prompt} of the usable ones."""
    root.mkdir(parents=True, exist_ok=True)
    text = root / "prompts.txt"
    # A byte-order mark, CRLF line ends, surrounding blanks, two blank lines, no final newline.
    text.write_bytes("\ufeff  a red cat on a mat \r\n\r\nmountains under a cloudy sky\n   \na small wooden house".encode())
    table = pa.table({"caption": ["two children playing", None, "  ", " an old yellow door "], "score": [1, 2, 3, 4]})
    parquet = root / "more" / "prompts.parquet"
    parquet.parent.mkdir()
    pq.write_table(table, parquet, row_group_size=2)
    return {
        f"{text}:1": "a red cat on a mat", f"{text}:3": "mountains under a cloudy sky", f"{text}:5": "a small wooden house",
        f"{parquet}#0": "two children playing", f"{parquet}#3": "an old yellow door",
    }


def test_prompts_come_from_text_and_parquet_files_and_folders(tmp_path: Path) -> None:
    expected = _write_prompt_files(tmp_path / "prompts")
    (tmp_path / "prompts" / "notes.md").write_text("not prompts")
    (tmp_path / "prompts" / ".hidden.txt").write_text("never read")
    dataset = build_raw_dataset(DataConfig(source="prompts", paths=[str(tmp_path / "prompts")]))
    assert isinstance(dataset, PromptDataset) and not dataset.has_reference
    items = [dataset[i] for i in range(len(dataset))]
    assert {item.key: item.caption for item in items} == expected
    assert [item.index for item in items] == list(range(5))
    stats = dataset.scan_stats
    assert stats.count(SkipReason.EMPTY_PROMPT) == 4 and stats.count(SkipReason.UNSUPPORTED_FILE) == 1
    assert sorted(stats.examples(SkipReason.EMPTY_PROMPT)) == sorted(
        [f"{tmp_path}/prompts/prompts.txt:2", f"{tmp_path}/prompts/prompts.txt:4",
         f"{tmp_path}/prompts/more/prompts.parquet#1", f"{tmp_path}/prompts/more/prompts.parquet#2"]
    )

    # Files named directly; batches carry prompts and no pixels.
    only_text = build_raw_dataset(DataConfig(source="prompts", paths=[str(tmp_path / "prompts" / "prompts.txt")]))
    batch = next(iter(ResumableLoader(only_text, 3, shuffle=False)))
    assert batch.pixels is None and batch.ref_pixels is None and len(batch) == 3
    assert batch.captions == ["a red cat on a mat", "mountains under a cloudy sky", "a small wooden house"]


def test_unusable_prompt_paths_are_errors_naming_the_file(tmp_path: Path) -> None:
    def dataset(*paths: Path, **kw: Any) -> PromptDataset:
        return build_raw_dataset(DataConfig(source="prompts", paths=[str(p) for p in paths], **kw))

    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"notes.md is neither a .txt nor a .parquet file"):
        dataset(tmp_path / "notes.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder .*empty contains no .txt or .parquet file"):
        dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        dataset(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8 text"):
        dataset(tmp_path / "latin1.txt")
    pq.write_table(pa.table({"text": ["a prompt"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"column 'caption' \(data.caption_column\) not found"):
        dataset(tmp_path / "other.parquet")
    assert len(dataset(tmp_path / "other.parquet", caption_column="text")) == 1
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match="no usable item .*empty_prompt: 3"):
        dataset(tmp_path / "blank.txt")


@pytest.mark.parametrize("key, value", [("image_column", "image"), ("ref_image_column", "ref"), ("ref_suffix", "_ref")])
def test_a_prompts_source_takes_no_image_keys(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"data.{key} set, but data.source: prompts has no images"):
        DataConfig(source="prompts", paths=[str(tmp_path)], **{key: value})
    # Image sources keep their default image column.
    assert DataConfig(source="parquet", paths=[str(tmp_path)]).image_column == "image"


# ---------------------------------------------------------------------------------------------- caches
@dataclasses.dataclass
class PromptCache:
    family: str
    data: DataConfig
    encoder: Any
    conditioner: Any
    prompts: dict[str, str]


def _encoder_section(family: str, folder: Path) -> Any:
    spec = backbone_spec(family)
    section = {"model_path": str(folder), "text_encoder_dtype": "float32", "vae_dtype": "float32"}
    if family != "qwen_image":
        # The tiny tokenizers' prompts are short; OpenUni's length includes its chat template (>= 16).
        section["max_sequence_length"] = 32 if family == "openuni" else 8
    known = {f.name for f in dataclasses.fields(spec.encoder_config_type)}  # OpenUni runs no text encoder
    return from_dict(spec.encoder_config_type, {k: v for k, v in section.items() if k in known}, prefix="encoder.")


@pytest.fixture(scope="module", params=families())
def prompt_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PromptCache:
    """A prompts-only cache of the txt + parquet prompts, built with the family's tiny encoders; the VAE
    encoder is booby-trapped: a prompts precompute must never encode pixels."""
    family = request.param
    root = tmp_path_factory.mktemp(f"prompts_{family}")
    prompts = _write_prompt_files(root / "prompts")
    tiny = importlib.import_module(f"twinflow.backbones.{family}.tiny_encoders")
    encoder = _encoder_section(family, tiny.save_tiny_model_folder(root / "encoders"))
    spec = backbone_spec(family)
    conditioner = spec.conditioner_from_config(encoder, "cpu")
    data = DataConfig(source="prompts", paths=[str(root / "prompts")], image_size=IMAGE_SIZE,
                      cache_dir=str(root / "cache"), shuffle=False)

    def no_pixels(*_: Any) -> None:
        raise AssertionError("a prompts precompute encoded pixels")

    encode = conditioner.pixels_to_latents
    conditioner.pixels_to_latents = no_pixels
    try:
        _, stats = precompute_cache(data, encoder, PrecomputeConfig(batch_size=2, shard_size=3, device="cpu"),
                                    conditioner=conditioner, progress=False)
    finally:
        conditioner.pixels_to_latents = encode
    assert stats.count(SkipReason.EMPTY_PROMPT) == 4 and stats.total == 4
    return PromptCache(family, data, encoder, conditioner, prompts)


def test_a_prompts_cache_stores_no_latents_and_records_their_shape(prompt_cache: PromptCache) -> None:
    data, conditioner = prompt_cache.data, prompt_cache.conditioner
    manifest = read_manifest(data.cache_dir)
    assert manifest["prompts_only"] is True and manifest["num_items"] == 5
    assert manifest["skipped"]["empty_prompt"] == 4
    # The shape the family's own VAE gives an image_size image (computed here by encoding one).
    encoded = conditioner.pixels_to_latents(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert manifest["latent_shape"] == list(encoded.shape[1:])
    assert [s["num_items"] for s in manifest["shards"]] == [3, 2]
    for shard in manifest["shards"]:
        with safe_open(str(Path(data.cache_dir) / shard["file"]), framework="pt") as f:
            assert "latents" not in f.keys() and "indices" in f.keys()


def test_batches_of_a_prompts_cache_have_zero_latents_and_the_prompts_conditions(prompt_cache: PromptCache) -> None:
    data, conditioner = prompt_cache.data, prompt_cache.conditioner
    dataset = CachedDataset(data.cache_dir)
    assert dataset.prompts_only
    schema = dataset.schema
    latent_shape = read_manifest(data.cache_dir)["latent_shape"]
    seen = []
    for batch in (dataset.collate([dataset[i] for i in rows]) for rows in ([0, 1, 2], [3, 4])):
        assert batch.latents.shape == (len(batch.keys), *latent_shape) and batch.latents.dtype == torch.float32
        assert not batch.latents.any()
        captions = [prompt_cache.prompts[key] for key in batch.keys]
        cond, uncond = conditioner.encode_pair(captions, None)
        for cached, live in ((batch.cond, cond), (batch.uncond, uncond)):
            cached_rows, live_rows = schema.rows(cached), schema.rows(live)
            assert len(cached_rows) == len(live_rows) == len(captions)
            for c, l in zip(cached_rows, live_rows):
                assert c.keys() == l.keys()
                for name in c:
                    torch.testing.assert_close(c[name], l[name], **TOL)
        seen += batch.keys
    assert sorted(seen) == sorted(prompt_cache.prompts)


def test_image_free_training_steps_on_a_prompts_cache(prompt_cache: PromptCache) -> None:
    from twinflow.method.config import TwinFlowConfig
    from twinflow.method.objective import TwinFlowObjective
    from twinflow.method.teachers import OnlineTeacher
    from twinflow.training.data import build_loader

    data = dataclasses.replace(prompt_cache.data, use_cache=True)
    with pytest.raises(ConfigError, match="'data.source' is 'prompts'.*method.use_image_free is false"):
        build_loader(data, None, 4, 0, 1)
    batch = next(iter(build_loader(data, None, 4, 0, 1, image_free=True)))
    spec = backbone_spec(prompt_cache.family)
    torch.manual_seed(0)
    model = spec.builder()(from_dict(spec.config_type, spec.tiny_config(), prefix="model."), "cpu")
    objective = TwinFlowObjective(TwinFlowConfig(use_image_free=True, kernels="eager"))

    def step(latents: torch.Tensor) -> Any:
        torch.manual_seed(1)
        return objective.training_step(model, latents, batch.cond, batch.uncond, OnlineTeacher(model))

    out = step(batch.latents)
    assert out.forward_rows["image_free"] == 4 and math.isfinite(out.loss.item())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The placeholders are read for their shape only: other values give the same loss, bit for bit.
    assert step(torch.randn_like(batch.latents)).loss.item() == out.loss.item()
