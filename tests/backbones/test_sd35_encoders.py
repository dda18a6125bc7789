"""SD3Conditioner on the tiny local SD3.5 folder: equal to diffusers' pipeline, negative prompt, VAE codec."""
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from twinflow.backbones.sd35.encoders import SD3Conditioner
from twinflow.backbones.sd35.tiny import TINY_CLIP_G_WIDTH, TINY_CLIP_L_WIDTH, TINY_T5_WIDTH
from twinflow.backbones.sd35.tiny_encoders import SD35_VAE_SCALING_FACTOR, SD35_VAE_SHIFT_FACTOR, save_tiny_model_folder

from t2i_helpers import tiny_fixture

PROMPTS = ["a red cat", "An oil painting of mountains, rivers and a small wooden house under a cloudy sky!"]
T5_LENGTH = 12


tiny = tiny_fixture(SD3Conditioner, save_tiny_model_folder, StableDiffusion3Pipeline, max_sequence_length=T5_LENGTH)


def test_tiny_folder_has_the_real_layout_and_tokenizers(tiny) -> None:
    tok, tok2, tok3 = tiny.conditioner.tokenizers
    assert tok.model_max_length == tok2.model_max_length == 77 and tok2.pad_token == "!"
    assert type(tok3).__name__ == "T5Tokenizer" and tok3.pad_token_id == 0 and tok3.eos_token_id == 1
    for t in (tok, tok2):  # CLIP's unk is its eos: any text tokenizes to known tokens and one final eos
        ids = t(PROMPTS[1]).input_ids
        assert ids[0] == t.bos_token_id and ids.index(t.eos_token_id) == len(ids) - 1
    assert tok3.unk_token_id not in tok3(PROMPTS[1]).input_ids
    assert tiny.conditioner.embed_dim == TINY_T5_WIDTH
    assert tiny.conditioner.pooled_dim == TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH
    assert tiny.conditioner.vae.config.scaling_factor == SD35_VAE_SCALING_FACTOR and tiny.conditioner.vae_scale_factor == 8


def test_prompts_encode_as_the_diffusers_pipeline(tiny) -> None:
    cond = tiny.conditioner.encode_prompts(PROMPTS)
    embeds, _, pooled, _ = tiny.pipeline.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
    )
    assert cond.embeds.shape == (2, 77 + T5_LENGTH, TINY_T5_WIDTH)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    clip_width = TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH
    assert torch.count_nonzero(cond.embeds[:, :77, clip_width:]) == 0
    valid = cond.mask.sum(dim=1)
    assert valid[0] < valid[1] and cond.mask[:, 0].all()


def test_unconditional_is_the_negative_prompt(tiny) -> None:
    assert tiny.conditioner.negative_prompt == "Generate an image."
    uncond = tiny.conditioner.encode_unconditional(3)
    _, neg, _, neg_pooled = tiny.pipeline.encode_prompt(
        ["x"], None, None, device="cpu", negative_prompt="Generate an image.", max_sequence_length=T5_LENGTH
    )
    assert len(uncond) == 3 and torch.equal(uncond.embeds, neg.expand(3, -1, -1))
    assert torch.equal(uncond.pooled, neg_pooled.expand(3, -1))
    cond, uncond2 = tiny.conditioner.encode_pair(PROMPTS)
    assert torch.equal(uncond2.embeds, uncond.embeds[:2]) and len(cond) == 2


def test_latents_are_shifted_and_scaled_posterior_means(tiny) -> None:
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = tiny.conditioner.pixels_to_latents(images)
    mean = tiny.conditioner.vae.encode(images).latent_dist.mean
    assert latents.shape == (2, 16, 4, 6)
    assert torch.allclose(latents, (mean - SD35_VAE_SHIFT_FACTOR) * SD35_VAE_SCALING_FACTOR)
    decoded = tiny.conditioner.latents_to_pixels(latents)
    expected = tiny.conditioner.vae.decode(latents / SD35_VAE_SCALING_FACTOR + SD35_VAE_SHIFT_FACTOR).sample
    assert torch.allclose(decoded, expected, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.conditioner.pixels_to_latents(images[..., :40])


def test_missing_parts_of_the_model_folder_are_named(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder_3"):
        SD3Conditioner.from_pretrained(tmp_path)
