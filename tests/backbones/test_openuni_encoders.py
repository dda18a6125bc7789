"""OpenUniConditioner on tiny local models: prompt format, padding, gradients into the head, DC-AE."""
import pytest
import torch
from transformers import AutoTokenizer

from twinflow.backbones.openuni.encoders import (
    PROMPT_TAIL,
    OpenUniConditioner,
    OpenUniPromptConditioner,
    format_negative_prompt,
    format_prompt,
)
from twinflow.backbones.openuni.tiny import TINY_LATENT_CHANNELS, TINY_LLM_HIDDEN_SIZE, TINY_NUM_QUERIES
from twinflow.backbones.openuni.tiny_encoders import (
    INTERNVL_SPECIAL_TOKENS,
    build_tiny_internvl,
    build_tiny_query_head,
    build_tiny_tokenizer,
    build_tiny_vae,
    save_tiny_model_folder,
)

from openuni_helpers import CAPTION, twin_sana

PROMPTS = ["a cat", "a red dog running on the beach with two children and a green plant"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("openuni"))


@pytest.fixture(scope="module")
def conditioner(folder):
    return OpenUniConditioner.from_pretrained(folder, llm_dtype=torch.float32, vae_dtype=torch.float32)


def test_prompts_use_the_reference_template():
    assert format_prompt("a cat") == (
        "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n<img>"
    )
    assert format_negative_prompt(None) == "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n<img>"
    assert format_negative_prompt(" blurry ") == (
        "<|im_start|>user\nGenerate an image: blurry<|im_end|>\n<|im_start|>assistant\n<img>"
    )


def test_tokenizer_saves_and_loads_with_internvl_tokens(folder):
    built, loaded = build_tiny_tokenizer(), AutoTokenizer.from_pretrained(folder / "internvl")
    ids = [loaded.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == len(loaded) - 1
    text = format_prompt("a photo of a bench")
    assert loaded(text).input_ids == built(text).input_ids
    assert loaded.convert_tokens_to_ids("<img>") in loaded(text).input_ids


def test_conditions_are_the_projected_queries_and_ignore_padding(conditioner):
    with torch.no_grad():
        both = conditioner.encode_prompts(PROMPTS)
        alone = conditioner.encode_prompts(PROMPTS[:1])
    assert both.embeds.shape == (2, TINY_NUM_QUERIES, CAPTION) and both.mask is None
    torch.testing.assert_close(alone.embeds[0], both.embeds[0], rtol=1e-5, atol=1e-5)
    assert (both.embeds[0] - both.embeds[1]).abs().max() > 1e-3


def test_query_states_follow_the_reference_positions(conditioner):
    """Prompt tokens then queries, positions counting valid tokens: the same as one unpadded sequence."""
    text = format_prompt(PROMPTS[0])
    ids = conditioner.tokenizer(text, return_tensors="pt").input_ids
    llm = conditioner.llm
    with torch.no_grad():
        embeds = torch.cat([llm.get_input_embeddings()(ids), conditioner.query_head.meta_queries[None]], dim=1)
        expected = llm(inputs_embeds=embeds).last_hidden_state[:, -TINY_NUM_QUERIES:]
        got = conditioner.query_states([text, format_prompt(PROMPTS[1])])[:1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_queries_connector_and_projector_not_the_llm():
    tokenizer = build_tiny_tokenizer()
    head = build_tiny_query_head()
    conditioner = OpenUniConditioner(build_tiny_internvl(tokenizer), tokenizer, build_tiny_vae(), head)
    cond, uncond = conditioner.encode_pair(PROMPTS)
    (cond.embeds.square().mean() + uncond.embeds.mean()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in conditioner.llm.parameters())
    with torch.no_grad():
        assert not conditioner.encode_prompts(PROMPTS).embeds.requires_grad


def test_pair_equals_separate_encodings(conditioner):
    with torch.no_grad():
        cond, uncond = conditioner.encode_pair(PROMPTS)
        torch.testing.assert_close(cond.embeds, conditioner.encode_prompts(PROMPTS).embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uncond.embeds, conditioner.encode_unconditional(2).embeds, rtol=1e-5, atol=1e-5)
    assert torch.equal(uncond.embeds[0], uncond.embeds[1])


def test_prompt_conditioner_gives_the_templates_token_ids(folder):
    """The trainer's conditioner: token ids of the reference template (no model run), right-padded; the
    negative prompt's repeated; a prompt over max_sequence_length loses prompt tokens, never the tail."""
    prompts = OpenUniPromptConditioner.from_pretrained(folder, vae_dtype="float32", max_sequence_length=20)
    tokenizer = prompts.tokenizer
    cond, uncond = prompts.encode_pair(PROMPTS[:1] + ["a dog"])
    expected = tokenizer(format_prompt("a cat"), add_special_tokens=False).input_ids
    assert cond.input_ids[0][cond.mask[0]].tolist() == expected
    negative = tokenizer(format_negative_prompt(None), add_special_tokens=False).input_ids
    assert uncond.input_ids.shape[0] == 2 and all(r[m].tolist() == negative for r, m in zip(uncond.input_ids, uncond.mask))
    long = prompts.encode_prompts([PROMPTS[1] * 3])
    assert long.input_ids.shape[1] == 20
    tail = tokenizer(PROMPT_TAIL, add_special_tokens=False).input_ids
    assert long.input_ids[0, -len(tail):].tolist() == tail
    assert tokenizer(format_prompt("a cat"), add_special_tokens=False).input_ids[-len(tail):] == tail
    with pytest.raises(ValueError, match="reference images"):
        prompts.encode_pair(["a cat"], torch.zeros(1, 3, 16, 16))


@torch.no_grad()
def test_dc_ae_latents_are_scaled(conditioner):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = conditioner.pixels_to_latents(images)
    assert latents.shape == (2, TINY_LATENT_CHANNELS, 8, 8)
    vae = conditioner.vae
    torch.testing.assert_close(latents, vae.encode(images).latent * vae.config.scaling_factor)
    pixels = conditioner.latents_to_pixels(latents)
    torch.testing.assert_close(pixels, vae.decode(latents / vae.config.scaling_factor).sample)
    with pytest.raises(ValueError, match="multiples"):
        conditioner.pixels_to_latents(torch.zeros(1, 3, 15, 16))
