"""The run logger: the resolved config at start, JSON-lines and TensorBoard scalars, skip counters,
rank-0-only files, and sample grids (one PNG per sampler preset, with the right number of images, NFE
and captions)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from twinflow.backbones.qwen_image.backbone import QwenImageBackbone
from twinflow.backbones.mlp import DualTimeMLP
from twinflow.backbones.qwen_image.tiny import TINY_LATENT_CHANNELS, tiny_transformer_config
from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
from twinflow.data.stats import DataStats, SkipReason
from twinflow.method.teachers import OnlineTeacher
from twinflow.training.config import load_train_config
from twinflow.training.observability import (
    CELL,
    MAX_COLUMNS,
    RunLogger,
    SamplePrompts,
    encoded_sample_prompts,
    latent_visualisation,
    write_sample_grids,
)

REPO = Path(__file__).resolve().parents[2]
ALL_PRESETS = {"one_step": 1, "few_step": 2, "any_step": 4, "multi_step": 30}


def _config(tmp_path: Path, *overrides: str):
    return load_train_config(REPO / "configs" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path}", *overrides])


LATENT = (TINY_LATENT_CHANNELS, 8, 8)


class CountingBackbone:
    """A backbone ``F(x, t, tt, cond)`` that counts its calls: the tiny Qwen-Image model (text
    conditions), or ``DualTimeMLP`` on flattened latents (class conditions; fast enough for 30 NFE)."""

    def __init__(self, kind: str = "mlp") -> None:
        torch.manual_seed(0)
        if kind == "qwen":
            self.module = QwenImageBackbone(TwinFlowQwenImageTransformer(**tiny_transformer_config()),
                                            dtype=torch.float32, edit=False)
        else:
            self.module = DualTimeMLP(data_dim=math.prod(LATENT), width=32, depth=2, num_classes=8)
        self.calls = 0

    def __call__(self, x, t, tt, cond):
        self.calls += 1
        if isinstance(self.module, DualTimeMLP):
            return self.module(x.flatten(1), t, tt, cond).view_as(x)
        return self.module(x, t, tt, cond)


def _prompts(n: int, decode=None) -> SamplePrompts:
    captions = [f"prompt number {i}" for i in range(n)]
    return SamplePrompts(torch.arange(n), captions, LATENT, decode)


def _png_meta(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["twinflow"]), image.size


def test_scalars_go_to_jsonl_and_tensorboard_every_log_every_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = DataStats()
    stats.record(SkipReason.CORRUPT_IMAGE, "a.jpg")
    stats.record(SkipReason.MISSING_CAPTION, "b.jpg")
    run = RunLogger(_config(tmp_path, "train.log_every=2"), rank=0, data_stats=stats, progress=False)
    for step in range(1, 5):
        run.log_step(step, {"loss": 1.0 / step, "loss/base": 0.5 / step, "loss/rect": 0.25, "grad_norm": 2.0 * step,
                            "lr": 1e-4, "samples_per_second": 10.0, "skipped_steps": float(step // 3)})
    run.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[1]["loss/base"] == pytest.approx(0.125)
    assert records[1]["grad_norm"] == 8.0
    assert records[1]["skipped_steps"] == 1.0
    assert records[1]["data/skipped_items"] == 2.0
    assert records[1]["data/skipped/corrupt_image"] == 1.0
    assert records[1]["memory/rss_gib"] > 0

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss/base")
    assert [e.step for e in loss] == [2, 4]
    assert loss[1].value == pytest.approx(0.125)
    assert [e.value for e in events.Scalars("data/skipped_items")] == [2.0, 2.0]


def test_the_resolved_config_is_printed_written_and_logged_at_start(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, "method.preset=rcgm_practice")
    run = RunLogger(config, rank=0, progress=False)
    run.close()
    written = (tmp_path / "resolved_config.yaml").read_text()
    assert load_train_config(tmp_path / "resolved_config.yaml") == config  # the same run, read back
    # Every key, the defaults and the preset's values included.
    assert "dist_match_cof: 0.0" in written and "enhanced_ratio: 0.5" in written and "kill_at_step: null" in written
    assert written in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]


def test_only_rank_zero_writes(tmp_path):
    out = tmp_path / "run"
    run = RunLogger(_config(out), rank=1, progress=False)
    run.log_step(10, {"loss": 1.0})
    run.close()
    assert not out.exists()


def test_one_grid_per_preset_with_every_prompt(tmp_path):
    backbone = CountingBackbone()
    written = write_sample_grids(tmp_path, "step0000007", backbone, _prompts(5), list(ALL_PRESETS), seed=3)
    assert set(written) == set(ALL_PRESETS)
    assert backbone.calls == sum(ALL_PRESETS.values())
    for name, nfe in ALL_PRESETS.items():
        assert written[name] == tmp_path / f"step0000007_{name}.png"
        meta, (width, height) = _png_meta(written[name])
        assert meta["nfe"] == nfe and meta["preset"] == name
        assert meta["captions"] == [f"prompt number {i}" for i in range(5)]
        assert width == MAX_COLUMNS * CELL  # 5 images: a full row of 4 and a second row
        assert height > 2 * CELL


def test_grids_show_the_decoded_images(tmp_path):
    def decode_red(latents):
        images = -torch.ones(latents.shape[0], 3, 16, 16)
        images[:, 0] = 1.0
        return images

    written = write_sample_grids(tmp_path, "s", CountingBackbone(), _prompts(2, decode_red), ["one_step"])
    with Image.open(written["one_step"]) as grid:
        assert grid.size[0] == 2 * CELL
        assert grid.convert("RGB").getpixel((CELL + CELL // 2, 24 + CELL // 2)) == (255, 0, 0)


def test_non_writing_rank_samples_but_writes_nothing(tmp_path):
    backbone = CountingBackbone()
    assert write_sample_grids(tmp_path, "s", backbone, _prompts(2), ["few_step"], write=False) == {}
    assert backbone.calls == 2
    assert not any(tmp_path.iterdir())


def test_maybe_sample_every_n_steps_from_synthetic_conditions(tmp_path):
    config = _config(tmp_path, "train.sample_every=2", "sampling.presets=[one_step, any_step]")
    backbone = CountingBackbone("qwen")
    run = RunLogger(config, rank=0, progress=False)
    for step in (1, 2, 3):
        run.maybe_sample(step, backbone.module, OnlineTeacher(backbone))
    run.close()
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["step0000002_any_step.png", "step0000002_one_step.png"]
    meta, _ = _png_meta(tmp_path / "samples" / files[0])
    assert meta["captions"] == ["synthetic item 0"]  # one per configured prompt
    assert backbone.calls == 1 + 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/any_step", "samples/one_step"]
    assert [e.step for e in events.Images("samples/one_step")] == [2]


def test_prompts_are_encoded_with_the_caches_text_encoder(tmp_path, monkeypatch):
    from twinflow.backbones.qwen_image.tiny_encoders import save_tiny_model_folder
    from twinflow.data import cache
    from twinflow.training.config import SamplingSection

    model = save_tiny_model_folder(tmp_path / "model")
    fingerprint = {"model_path": str(model), "variant": "t2i", "max_sequence_length": 64, "negative_prompt": " ",
                   "text_encoder_dtype": "float32", "vae_dtype": "float32"}
    monkeypatch.setattr(cache, "read_manifest", lambda d: {"fingerprint": fingerprint} if d == "the-cache" else None)
    sampling = SamplingSection(prompts=["a red cat", "two dogs on a beach"], height=64, width=48)
    prompts = encoded_sample_prompts("the-cache", sampling, decode=True)
    assert prompts.captions == ["a red cat", "two dogs on a beach"]
    assert prompts.latent_shape == (TINY_LATENT_CHANNELS, 8, 6)
    assert prompts.conditions.embeds.shape[0] == 2 and prompts.conditions.mask.any(dim=1).all()
    images = prompts.decode(torch.zeros(2, *prompts.latent_shape))
    assert images.shape == (2, 3, 64, 48)
    assert encoded_sample_prompts("the-cache", sampling, decode=False).decode is None


def test_latent_visualisation_is_an_image_in_range():
    latents = torch.randn(3, 4, 8, 8) * 5
    images = latent_visualisation(latents)
    assert images.shape == (3, 3, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.allclose(images.amin(dim=(1, 2, 3)), torch.full((3,), -1.0))
