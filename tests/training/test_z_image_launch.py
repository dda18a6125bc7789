"""Z-Image through the whole product on 2 CPU ranks: a tiny raw dataset -> ``python -m
twinflow.data.precompute`` (tiny Qwen3 encoder and VAE) -> ``deepspeed --module twinflow.train`` (ZeRO-3,
EMA teacher) -> resume from the middle with equal losses -> ``twinflow export`` -> ``from_pretrained`` ->
``twinflow sample`` at 1, 2, 4 and 30 NFE; the same for LoRA (peft) with the EMA adapter.

Four launches in all (a straight run and a resumed one per mode), ~30-60 s each here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch_helpers import PRESETS, REPO, check_resume, precompute, tiny_parquet_data, train_resume_export_sample

TINY = REPO / "configs" / "tiny_cpu_z_image.yaml"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=4.0", "method.ema_decay_rate=0.9"]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny parquet dataset encoded through the real precompute; returns the folder and the data section."""
    from twinflow.backbones.z_image.tiny_encoders import save_tiny_model_folder

    root = tmp_path_factory.mktemp("z_image")
    encoders = save_tiny_model_folder(root / "encoders")
    data = tiny_parquet_data(root, image_px=64, image_size=64)
    precompute(root, "precompute", "z_image", data, {"model_path": str(encoders), "max_sequence_length": 32,
                                                    "text_encoder_dtype": "float32", "vae_dtype": "float32"})
    return root, data


def _train_config(root: Path, data: dict, name: str, pretrained: bool) -> Path:
    """The tiny config on the cache; ``pretrained``: the tiny transformer saved as a model folder instead of
    the inline one (a LoRA checkpoint holds the adapters only, so its export reads the base weights there)."""
    config = yaml.safe_load(TINY.read_text())
    del config["synthetic_data"]
    config["data"] = data
    config["train"]["sample_every"] = 0
    if pretrained:
        from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer

        TwinFlowZImageTransformer(**config["model"].pop("transformer")).save_pretrained(root / name / "base")
        config["model"]["pretrained"] = str(root / name / "base")
    path = root / name / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mode(cache, name: str, overrides: list[str], export_args: list[str]) -> dict:
    root, data = cache
    out = root / name
    out.mkdir()
    config = _train_config(root, data, name, pretrained=bool(export_args))
    return train_resume_export_sample(config, out, overrides, export_args, height=32)


@pytest.fixture(scope="module")
def full(cache) -> dict:
    return _mode(cache, "full", [], [])


@pytest.fixture(scope="module")
def lora(cache) -> dict:
    return _mode(cache, "lora", LORA, ["--merge-lora"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resumed_run_reproduces_the_straight_runs_losses(mode, request):
    check_resume(request.getfixturevalue(mode))


@pytest.mark.parametrize("mode,folder", [("full", ""), ("lora", "transformer")])
def test_export_loads_with_from_pretrained_and_samples_at_every_preset(mode, folder, request):
    from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer

    run = request.getfixturevalue(mode)
    model, info = TwinFlowZImageTransformer.from_pretrained(run["export"] / folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert any(k.startswith("t_embedder_2.") for k in model.state_dict())
    assert len(run["samples"]) == len(PRESETS), run["samples"]
    if mode == "lora":
        assert (run["export"] / "lora" / "pytorch_lora_weights.safetensors").is_file()
