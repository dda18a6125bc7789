"""OpenUni through the whole product on 2 CPU ranks: a tiny OpenUni folder (InternVL3 with tokenizer, query
head, DC-AE, SANA) and a tiny raw dataset -> ``python -m twinflow.data.precompute`` (prompt tokens and DC-AE
latents) -> ``deepspeed --module twinflow.train`` (ZeRO-3, the queries/connector/projector trained with SANA
through the frozen LLM, EMA teacher) -> resume from the middle with equal losses -> ``twinflow export`` ->
``from_pretrained`` -> ``twinflow sample`` at 1, 2, 4 and 30 NFE. The same for LoRA (peft on SANA, the
EMA adapter, the head frozen) and for image-free training (a prompts-only text file, no images: every batch is
the model's own one-step samples; the reference's imgfree values, a frozen teacher and enhanced_ratio 4).

Two launches per mode (a straight run and a resumed one), ~30-60 s each here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from launch_helpers import PRESETS, REPO, check_resume, precompute, tiny_parquet_data, train_resume_export_sample

TINY = REPO / "configs" / "tiny_cpu_openuni.yaml"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=4.0", "model.train_query_head=false",
        "method.ema_decay_rate=0.9"]
IMAGE_FREE = ["method.use_image_free=true", "method.ema_decay_rate=1.0", "method.enhanced_ratio=4.0"]
pytestmark = pytest.mark.distributed


def _precompute(root: Path, model: Path, data: dict, name: str) -> None:
    precompute(root, name, "openuni", data, {"model_path": str(model), "max_sequence_length": 48, "vae_dtype": "float32"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The tiny OpenUni folder and a tiny parquet dataset encoded through the real precompute; returns the
    root, the model folder and the data section."""
    from twinflow.backbones.openuni.tiny_encoders import save_tiny_model_folder

    root = tmp_path_factory.mktemp("openuni")
    model = save_tiny_model_folder(root / "model")
    data = tiny_parquet_data(root, image_px=32, image_size=16)
    _precompute(root, model, data, "precompute")
    return root, model, data


@pytest.fixture(scope="module")
def prompts_cache(cache) -> tuple[Path, Path, dict]:
    """A prompts-only cache of the same tiny model: a text file of prompts, no images."""
    root, model, _ = cache
    (root / "prompts.txt").write_text("".join(f"a drawing of thing {i}\n" for i in range(8)) + "\n")
    data = {"source": "prompts", "paths": [str(root / "prompts.txt")], "image_size": 16, "use_cache": True,
            "cache_dir": str(root / "prompts_cache"), "cache_dtype": "float32"}
    _precompute(root, model, data, "precompute_prompts")
    return root, model, data


def _train_config(root: Path, model: Path, data: dict, name: str) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["model"]["pretrained"] = str(model)
    config["data"] = data
    path = root / name / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mode(cache, name: str, overrides: list[str], export_args: list[str]) -> dict:
    root, model, data = cache
    out = root / name
    out.mkdir()
    run = train_resume_export_sample(_train_config(root, model, data, name), out, overrides, export_args, height=16)
    return {**run, "model": model}


@pytest.fixture(scope="module")
def full(cache) -> dict:
    return _mode(cache, "full", [], [])


@pytest.fixture(scope="module")
def lora(cache) -> dict:
    return _mode(cache, "lora", LORA, ["--merge-lora"])


@pytest.fixture(scope="module")
def image_free(prompts_cache) -> dict:
    # A frozen teacher keeps no EMA: the export is the online weights.
    return _mode(prompts_cache, "image_free", IMAGE_FREE, ["--weights", "online"])


@pytest.mark.parametrize("mode", ["full", "lora", "image_free"])
def test_resumed_run_reproduces_the_straight_runs_losses(mode, request):
    check_resume(request.getfixturevalue(mode))


@pytest.mark.parametrize("mode", ["full", "lora", "image_free"])
def test_export_loads_with_from_pretrained_and_samples_at_every_preset(mode, request):
    from twinflow.backbones.openuni.query_head import OpenUniQueryHead
    from twinflow.backbones.openuni.transformer import TwinFlowSanaTransformer

    run = request.getfixturevalue(mode)
    model, info = TwinFlowSanaTransformer.from_pretrained(run["export"] / "transformer", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert any(k.startswith("time_embed_2.") for k in model.state_dict())
    head = OpenUniQueryHead.from_pretrained(run["export"] / "query_head")
    start = OpenUniQueryHead.from_pretrained(run["model"] / "query_head")
    moved = not torch.equal(head.meta_queries, start.meta_queries)
    # Full runs train the queries (through the frozen LLM); LoRA runs keep the head as it was.
    assert moved == (mode != "lora")
    assert len(run["samples"]) == len(PRESETS), run["samples"]
    if mode == "lora":
        assert (run["export"] / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_checkpoint_holds_the_trained_parts_only(full):
    """The frozen language model is outside the engine: no checkpoint or export layout entry names it, and
    the queries, connector and projector are trained parameters beside SANA's."""
    import json

    meta = json.loads((full["checkpoint"] / "meta.json").read_text())
    names = [e["name"] for e in meta["layout"]["trainable"]]
    assert any(n.startswith("transformer.query_head.meta_queries") for n in names)
    assert any(n.startswith("transformer.query_head.connector.") for n in names)
    assert any(n.startswith("transformer.sana.time_embed_2.") for n in names)
    assert not any("llm" in n or "language_model" in n for n in names)
