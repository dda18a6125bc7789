"""Qwen-Image conditioning on the tiny locally built models, loaded through the real from_pretrained."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from twinflow.backbones.qwen_image.condition import QwenCondition
from twinflow.backbones.qwen_image.encoders import (
    PROMPT_TEMPLATES,
    EncoderConfig,
    QwenImageConditioner,
    tensor_to_pil,
)
from twinflow.backbones.qwen_image.tiny import TINY_LATENT_CHANNELS, tiny_transformer_config
from twinflow.backbones.qwen_image.tiny_encoders import (
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    build_tiny_vae,
    save_tiny_model_folder,
)

PROMPTS = ["a red cat", "mountains under a cloudy sky at sunset, oil painting", "dog"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny_encoders"))


@pytest.fixture(scope="module")
def conditioners(model_dir: Path) -> dict[str, QwenImageConditioner]:
    return {
        v: QwenImageConditioner.from_pretrained(model_dir, variant=v, text_encoder_dtype=torch.float32, vae_dtype=torch.float32)
        for v in PROMPT_TEMPLATES
    }


def _images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def _hidden_by_hand(cond: QwenImageConditioner, text: str, image: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's last hidden state for one templated prompt, every token (no batching)."""
    formatted = cond.template.text.format(cond.template.image_prefix + text)
    if image is None:
        inputs = cond.tokenizer([formatted], return_tensors="pt")
    else:
        inputs = cond.processor(text=[formatted], images=cond._vl_images(image[None]), return_tensors="pt")
    out = cond.text_encoder(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, output_hidden_states=True)
    return out.hidden_states[-1][0]


def test_tiny_folder_loads_offline_through_from_pretrained(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cond = QwenImageConditioner.from_pretrained(model_dir, text_encoder_dtype=torch.float32, vae_dtype=torch.float32)
    assert isinstance(cond.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(cond.tokenizer, Qwen2Tokenizer)
    assert isinstance(cond.vae, AutoencoderKLQwenImage)
    assert cond.embed_dim == tiny_transformer_config()["joint_attention_dim"]
    assert cond.latent_channels == TINY_LATENT_CHANNELS and cond.vae_scale_factor == 8
    # The saved weights are the seeded builders' weights: the folder is reproducible.
    built = build_tiny_text_encoder(build_tiny_tokenizer(), seed=0).state_dict()
    for name, tensor in cond.text_encoder.state_dict().items():
        assert torch.equal(tensor, built[name]), name
    built_vae = build_tiny_vae(seed=0).state_dict()
    assert all(torch.equal(t, built_vae[n]) for n, t in cond.vae.state_dict().items())
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(cond.tokenizer(token).input_ids) == 1, token


def test_missing_parts_of_the_model_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        QwenImageConditioner.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match="has no 'vae/' subfolder"):
        QwenImageConditioner.from_pretrained(tmp_path)
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="has no 'processor/' subfolder"):
        QwenImageConditioner.from_pretrained(tmp_path, variant="edit")
    with pytest.raises(ValueError, match="max_sequence_length must be in"):
        EncoderConfig(model_path="x", max_sequence_length=2048)


def test_template_tokens_are_dropped(conditioners: dict[str, QwenImageConditioner]) -> None:
    cond = conditioners["t2i"]
    tok = cond.tokenizer
    # The dropped count is the template up to and including "<|im_start|>user\n".
    template = PROMPT_TEMPLATES["t2i"].text
    assert cond.drop_tokens == len(tok(template.split("{}")[0]).input_ids)
    suffix = len(tok("<|im_end|>\n<|im_start|>assistant\n").input_ids)
    out = cond.encode_prompts(PROMPTS)
    assert isinstance(out, QwenCondition) and out.ref_latents is None
    for row, prompt in enumerate(PROMPTS):
        own = len(tok(prompt).input_ids)
        assert int(out.mask[row].sum()) == own + suffix  # the prompt's own tokens + the kept closing turn
        full = _hidden_by_hand(cond, prompt)
        assert full.shape[0] == cond.drop_tokens + own + suffix
        torch.testing.assert_close(out.embeds[row, : own + suffix], full[cond.drop_tokens :], rtol=1e-5, atol=1e-5)


def test_masks_pad_and_batches_are_independent(conditioners: dict[str, QwenImageConditioner]) -> None:
    cond = conditioners["t2i"]
    out = cond.encode_prompts(PROMPTS)
    lengths = out.mask.sum(1)
    assert out.embeds.shape == (3, int(lengths.max()), cond.embed_dim)
    for row in range(3):
        n = int(lengths[row])
        assert out.mask[row, :n].all() and not out.mask[row, n:].any()  # valid tokens first, then padding
        assert torch.count_nonzero(out.embeds[row, n:]) == 0
        alone = cond.encode_prompts([PROMPTS[row]])
        assert alone.embeds.shape[1] == n
        torch.testing.assert_close(out.embeds[row, :n], alone.embeds[0], rtol=1e-5, atol=1e-5)


def test_max_sequence_length_truncates_after_the_template(model_dir: Path, conditioners) -> None:
    short = QwenImageConditioner.from_pretrained(
        model_dir, max_sequence_length=4, text_encoder_dtype=torch.float32, vae_dtype=torch.float32
    )
    full = conditioners["t2i"].encode_prompts([PROMPTS[1]])
    cut = short.encode_prompts([PROMPTS[1]])
    assert cut.embeds.shape[1] == 4 and cut.mask.all()
    torch.testing.assert_close(cut.embeds[0], full.embeds[0, :4], rtol=1e-5, atol=1e-5)


def test_unconditional_is_the_negative_prompt(conditioners: dict[str, QwenImageConditioner]) -> None:
    cond = conditioners["t2i"]
    assert cond.negative_prompt == "Generate an image."
    uncond = cond.encode_unconditional(3)
    neg = cond.encode_prompts(["Generate an image."])
    assert uncond.embeds.shape == (3, neg.embeds.shape[1], cond.embed_dim)
    for row in range(3):
        torch.testing.assert_close(uncond.embeds[row], neg.embeds[0], rtol=1e-5, atol=1e-5)
    c, u = cond.encode_pair(PROMPTS[:2])
    assert len(c) == len(u) == 2
    with pytest.raises(ValueError, match="takes no ref_images"):
        cond.encode_prompts(PROMPTS[:2], _images(0))


def test_latent_normalisation_matches_the_vae_by_hand(conditioners: dict[str, QwenImageConditioner]) -> None:
    cond = conditioners["t2i"]
    images = _images(1, batch=2, size=32)
    latents = cond.pixels_to_latents(images)
    assert latents.shape == (2, TINY_LATENT_CHANNELS, 4, 4)
    vae = cond.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(std, torch.ones_like(std))
    with torch.no_grad():
        raw = vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0]
        decoded = vae.decode(((latents * std) + mean).unsqueeze(2)).sample[:, :, 0]
    torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.latents_to_pixels(latents), decoded, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"multiples of 16.*\(1, 3, 40, 40\)"):
        cond.pixels_to_latents(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 32, 32\)"):
        cond.pixels_to_latents(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        cond.latents_to_pixels(torch.zeros(1, 16, 4, 4))


@pytest.mark.parametrize("variant", ["edit", "edit_plus"])
def test_edit_reference_goes_through_vl_encoder_and_vae(conditioners, variant: str) -> None:
    cond = conditioners[variant]
    refs = _images(2, batch=2, size=32)
    c, u = cond.encode_pair(PROMPTS[:2], refs)
    torch.testing.assert_close(c.ref_latents, cond.pixels_to_latents(refs))
    assert torch.equal(u.ref_latents, c.ref_latents)
    assert cond.negative_prompt == "Edit this image."
    image_token = cond.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row in range(2):
        for out, text in ((c, PROMPTS[row]), (u, "Edit this image.")):
            full = _hidden_by_hand(cond, text, refs[row])
            n = int(out.mask[row].sum())
            assert n == full.shape[0] - cond.drop_tokens  # the vision tokens are kept, the system turn dropped
            torch.testing.assert_close(out.embeds[row, :n], full[cond.drop_tokens :], rtol=1e-5, atol=1e-5)
    formatted = cond.template.text.format(cond.template.image_prefix + PROMPTS[0])
    ids = cond.processor(text=[formatted], images=tensor_to_pil(refs[:1]), return_tensors="pt")["input_ids"][0]
    assert (ids[cond.drop_tokens :] == image_token).sum() >= 1
    # The embedding depends on the reference image, not only on the text.
    other = cond.encode_prompts(PROMPTS[:2], _images(3, batch=2, size=32))
    assert not torch.allclose(other.embeds[c.mask], c.embeds[c.mask])
    with pytest.raises(ValueError, match="needs ref_images"):
        cond.encode_prompts(PROMPTS[:2])
