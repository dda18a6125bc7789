"""The sampler driving the real (tiny, randomly initialised) Qwen-Image backbone with text conditions.

This pins the integration points the closed-form tests cannot: batched guidance through
``QwenCondition.cat`` (prompts of different lengths are re-padded when the conditional and
unconditional rows are joined), the backbone's latent shapes, and dtypes.
"""
from __future__ import annotations

import pytest
import torch

from twinflow.backbones.qwen_image.condition import QwenCondition
from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
from twinflow.backbones.qwen_image.tiny import TINY_LATENT_CHANNELS, tiny_transformer_config
from twinflow.sampling import SamplerConfig, sample


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model = build_qwen_image_backbone(
        QwenImageBackboneConfig(transformer=tiny_transformer_config(), dtype="float32", attention_backend="native"), "cpu"
    )
    return model.eval()


def _condition(batch: int, length: int, seed: int) -> QwenCondition:
    gen = torch.Generator().manual_seed(seed)
    text_dim = tiny_transformer_config()["joint_attention_dim"]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length - 2 :] = False  # one shorter prompt in the batch
    return QwenCondition(torch.randn(batch, length, text_dim, generator=gen), mask)


def test_guided_sampling_with_text_conditions_of_different_lengths(backbone):
    batch = 2
    noise = torch.randn(batch, TINY_LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = _condition(batch, 7, seed=2), _condition(batch, 3, seed=3)
    settings = dict(sampling_steps=3, stochast_ratio=0.0, rfba_gap_steps=[0.001, 0.5], sampling_style="any")

    plain = sample(backbone, noise, cond, config=SamplerConfig.from_dict(settings))
    # Scale 1 is the conditional velocity alone, but computed from a batch where cond and uncond rows
    # are joined (uncond re-padded to 7 tokens): equal up to float rounding.
    unit = sample(backbone, noise, cond, uncond, config=SamplerConfig.from_dict({**settings, "cfg_scale": 1.0}))
    guided = sample(backbone, noise, cond, uncond, config=SamplerConfig.from_dict({**settings, "cfg_scale": 4.0}))

    assert plain.sample.shape == noise.shape and torch.isfinite(guided.sample).all()
    torch.testing.assert_close(unit.sample, plain.sample, rtol=1e-4, atol=1e-5)
    assert (guided.sample - plain.sample).abs().max() > 1e-3
    assert (plain.nfe, plain.guided_nfe) == (3, 0)
    assert (guided.nfe, guided.guided_nfe, guided.batch_forwards) == (3, 3, 6)
