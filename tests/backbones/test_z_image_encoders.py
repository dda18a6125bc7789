"""ZImageConditioner on the tiny local Z-Image folder: equal to diffusers' pipeline, negative prompt, VAE codec."""
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline

from twinflow.backbones.z_image.encoders import ZImageConditioner
from twinflow.backbones.z_image.tiny import TINY_CAPTION_WIDTH
from twinflow.backbones.z_image.tiny_encoders import FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, save_tiny_model_folder

from t2i_helpers import tiny_fixture

PROMPTS = ["a red cat", "an oil painting of mountains, rivers and a small wooden house under a cloudy sky at sunset"]
LENGTH = 32


tiny = tiny_fixture(ZImageConditioner, save_tiny_model_folder, ZImagePipeline, max_sequence_length=LENGTH)


def test_chat_template_renders_qwen3_user_turns(tiny) -> None:
    assert tiny.conditioner._render("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    thinking_off = tiny.conditioner.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert thinking_off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tiny.conditioner.embed_dim == TINY_CAPTION_WIDTH


def test_prompts_encode_as_the_diffusers_pipeline(tiny) -> None:
    cond = tiny.conditioner.encode_prompts(PROMPTS)
    embeds, _ = tiny.pipeline.encode_prompt(
        list(PROMPTS), device="cpu", do_classifier_free_guidance=False, max_sequence_length=LENGTH
    )
    lengths = cond.mask.sum(dim=1).tolist()
    assert lengths == [e.shape[0] for e in embeds] and lengths[1] == LENGTH  # the long prompt is truncated
    assert all(torch.equal(a, b) for a, b in zip(cond.captions(), embeds))
    assert cond.embeds.shape[1] == LENGTH and torch.count_nonzero(cond.embeds[0, lengths[0]:]) == 0


def test_unconditional_is_the_empty_prompt(tiny) -> None:
    assert tiny.conditioner.negative_prompt == ""
    uncond = tiny.conditioner.encode_unconditional(2)
    _, neg = tiny.pipeline.encode_prompt(["x"], device="cpu", max_sequence_length=LENGTH)
    assert len(uncond) == 2 and all(torch.equal(c, neg[0]) for c in uncond.captions())


def test_latents_are_shifted_and_scaled_posterior_means(tiny) -> None:
    images = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = tiny.conditioner.pixels_to_latents(images)
    mean = tiny.conditioner.vae.encode(images).latent_dist.mean
    assert latents.shape == (2, 16, 4, 2) and tiny.conditioner.vae_scale_factor == 8
    assert torch.allclose(latents, (mean - FLUX_VAE_SHIFT_FACTOR) * FLUX_VAE_SCALING_FACTOR)
    expected = tiny.conditioner.vae.decode(latents / FLUX_VAE_SCALING_FACTOR + FLUX_VAE_SHIFT_FACTOR).sample
    assert torch.allclose(tiny.conditioner.latents_to_pixels(latents), expected, atol=1e-6)


def test_missing_parts_of_the_model_folder_are_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        ZImageConditioner.from_pretrained(tmp_path)
