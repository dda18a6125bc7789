"""SD3.5 through the whole product on 2 CPU ranks: the real precompute builds a cache (pooled embeddings
and the negative prompt included) from a tiny raw folder with the tiny encoders; ``deepspeed --num_gpus 2
--module twinflow.train`` trains the tiny transformer, saves, and a second launch resumes from the step-2
checkpoint with the straight run's losses and final state; the checkpoint exports; ``from_pretrained`` of
the TwinFlow SD3 transformer loads the export; ``twinflow sample`` draws from it at 1, 2, 4 and 30 NFE.
The same for LoRA (peft on a pretrained tiny base, the EMA adapter as teacher). Four training launches.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from test_distributed import ENV, REPO, _losses, _tail, launch

pytestmark = pytest.mark.distributed
TINY = REPO / "tests" / "training" / "data" / "tiny_cpu_sd35.yaml"
CAPTIONS = ["a red cat", "a blue dog on the beach", "mountains at sunset", "a small wooden house",
            "a green plant", "two children playing", "an old square clock", "a bright round lamp"]
PRESETS = {"one_step": 1, "few_step": 2, "any_step": 4, "multi_step": 30}


def _raw_folder(root: Path) -> Path:
    """Eight 64 px images with caption files (the folder source)."""
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"item{i}.png")
        (root / f"item{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The tiny encoder folder, a raw folder and its cache, built by ``python -m twinflow.data.precompute``."""
    from twinflow.backbones.sd35.tiny_encoders import save_tiny_model_folder

    root = tmp_path_factory.mktemp("sd35")
    encoders = save_tiny_model_folder(root / "encoders")
    data = {"source": "folder", "paths": [str(_raw_folder(root / "images"))], "image_size": 64,
            "cache_dir": str(root / "cache"), "use_cache": True}
    job = {"model": {"family": "sd35"}, "data": data, "precompute": {"batch_size": 3, "device": "cpu"},
           "encoder": {"model_path": str(encoders), "max_sequence_length": 8, "text_encoder_dtype": "float32",
                       "vae_dtype": "float32"}}
    (root / "precompute.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "twinflow.data.precompute", "--config", str(root / "precompute.yaml"),
                           "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "encoders": encoders, "data": data}


def _config(setup: dict, name: str, **changes) -> dict:
    config = yaml.safe_load(TINY.read_text())
    config["data"] = dict(setup["data"])
    for section, values in changes.items():
        config[section] = {**config[section], **values}
    return config


def _train_resume_export(setup: dict, name: str, config: dict, *, merge_lora: bool) -> dict:
    """Straight 4-step run, a run resumed from its step-2 checkpoint in another folder, and the export."""
    from twinflow.training.export import export_checkpoint

    root = setup["root"] / name
    root.mkdir()
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    straight, resumed = root / "straight", root / "resumed"
    base = ["--module", "twinflow.train", "--config", str(path)]
    assert launch(base + [f"train.output_dir={straight}"], root / "straight.log") == 0, _tail(root / "straight.log")
    step2 = straight / "checkpoints" / "step_00000002"
    assert launch(base + [f"train.output_dir={resumed}", f"train.resume={step2}"], root / "resumed.log") == 0, \
        _tail(root / "resumed.log")
    exported = export_checkpoint(straight / "checkpoints" / "step_00000004", root / "export", weights="ema",
                                 merge_lora=merge_lora)
    return {"straight": straight, "resumed": resumed, "export": Path(exported)}


def _assert_resume_equals_straight(run: dict) -> None:
    reference, got = _losses(run["straight"] / "metrics.jsonl"), _losses(run["resumed"] / "metrics.jsonl")
    assert sorted(reference) == [1, 2, 3, 4] and sorted(got) == [3, 4], (reference, got)
    for step, values in got.items():
        for value in values:
            assert value == pytest.approx(reference[step][0], rel=1e-5, abs=1e-6), step
    for rank in range(2):
        a, b = (load_file(str(r / "checkpoints" / "step_00000004" / f"rank-{rank:05d}.safetensors"))
                for r in (run["straight"], run["resumed"]))
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def _assert_samples(setup: dict, model: Path, out: Path, capsys) -> None:
    from twinflow import cli

    code = cli.main(["sample", "--model", str(model), "--encoders", str(setup["encoders"]), "--prompt", "a red cat",
                     *[a for p in PRESETS for a in ("--preset", p)], "--height", "64", "--width", "64",
                     "--device", "cpu", "--output", str(out)])
    assert code == 0
    paths = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert len(paths) == len(PRESETS)
    for path, nfe in zip(paths, PRESETS.values()):
        with Image.open(path) as grid:
            assert json.loads(grid.text["twinflow"])["nfe"] == nfe


@pytest.fixture(scope="module")
def full(setup) -> dict:
    return _train_resume_export(setup, "full", _config(setup, "full"), merge_lora=False)



@pytest.fixture(scope="module")
def lora(setup) -> dict:
    from twinflow.backbones.sd35.tiny import tiny_transformer_config
    from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer

    base = setup["root"] / "base_transformer"  # a plain single-embedder model, as the reference's LoRA runs use
    torch.manual_seed(0)
    TwinFlowSD3Transformer(**tiny_transformer_config(), twin_embedder=False).save_pretrained(base)
    config = _config(setup, "lora", method={"preset": "lora_1order", "probs": {"e2e": 1, "mul": 1, "any": 0, "adv": 1,
                                                                                "one": 1}, "estimate_order": 1})
    del config["model"]["transformer"]
    config["model"].update(pretrained=str(base), twin_embedder=False,
                           lora={"enabled": True, "rank": 4, "alpha": 4.0, "ema_adapter": True})
    assert 0 < config["method"]["ema_decay_rate"] < 1
    run = _train_resume_export(setup, "lora", config, merge_lora=True)
    run["base"] = base
    return run


def test_precompute_stores_pooled_embeddings_and_the_negative_prompt(setup):
    from twinflow.data.cache import CachedDataset

    cache = CachedDataset(setup["data"]["cache_dir"])
    assert cache.manifest["format"] == "twinflow-sd35-cache"
    assert cache.manifest["pooled_dim"] == 24 and cache.manifest["text_length"] == 77 + 8
    assert cache.manifest["fingerprint"]["negative_prompt"] == "Generate an image."
    uncond = cache.unconditional(2)
    assert uncond.pooled.shape == (2, 24) and uncond.embeds.shape == (2, 85, 32)


def test_full_run_resumes_with_equal_losses(full):
    _assert_resume_equals_straight(full)


def test_full_export_loads_with_from_pretrained_and_samples(setup, full, capsys):
    from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer
    from twinflow.training.export import consolidate_checkpoint

    model = TwinFlowSD3Transformer.from_pretrained(str(full["export"]))
    _, ema = consolidate_checkpoint(full["straight"] / "checkpoints" / "step_00000004", "ema")
    state = model.state_dict()
    assert any(k.startswith("time_text_embed_2.") for k in state)
    # Every trained tensor, plus SD3's fixed position table (a buffer no checkpoint holds).
    assert sorted(state) == sorted([k[len("transformer."):] for k in ema] + ["pos_embed.pos_embed"])
    for key, value in ema.items():
        assert torch.equal(state[key[len("transformer."):]], value), key
    _assert_samples(setup, full["export"], full["export"].parent / "samples", capsys)


def test_lora_run_resumes_with_equal_losses(lora):
    _assert_resume_equals_straight(lora)


def test_lora_export_merges_the_ema_adapter_and_samples(setup, lora, capsys):
    from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer

    export = lora["export"]
    assert (export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = TwinFlowSD3Transformer.from_pretrained(str(export / "transformer")).state_dict()
    base = TwinFlowSD3Transformer.from_pretrained(str(lora["base"])).state_dict()
    assert sorted(merged) == sorted(base) and not any(k.startswith("time_text_embed_2.") for k in merged)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(".attn." in k or "timestep_embedder" in k for k in changed), changed
    _assert_samples(setup, export, export.parent / "samples", capsys)
