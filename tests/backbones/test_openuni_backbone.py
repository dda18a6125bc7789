"""OpenUniBackbone: F(x_t, t, tt, prompt tokens) = SANA at 1000 t on the query head's output, the frozen LLM
run inside (outside the module tree), gradients into the queries, connector, projector and SANA."""
import dataclasses

import pytest
import torch

from twinflow.backbones.openuni import OpenUniCondition
from twinflow.backbones.openuni.backbone import OpenUniBackbone, OpenUniGenerator
from twinflow.backbones.openuni.condition import OpenUniPrompt
from twinflow.backbones.openuni.encoders import OpenUniConditioner, OpenUniPromptConditioner
from twinflow.backbones.openuni.tiny import TINY_LATENT_CHANNELS
from twinflow.backbones.openuni.tiny_encoders import (
    build_tiny_internvl,
    build_tiny_query_head,
    build_tiny_tokenizer,
    build_tiny_vae,
)

from openuni_helpers import twin_sana

PROMPTS = ["a cat", "a red dog running on the beach with two children and a green plant", "a cat"]


@pytest.fixture()
def parts():
    tokenizer = build_tiny_tokenizer()
    internvl, head, vae = build_tiny_internvl(tokenizer), build_tiny_query_head(), build_tiny_vae()
    backbone = OpenUniBackbone(OpenUniGenerator(twin_sana(), head), internvl.model.language_model, dtype=torch.float32)
    return backbone, OpenUniPromptConditioner(tokenizer, vae), OpenUniConditioner(internvl, tokenizer, vae, head)


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY_LATENT_CHANNELS, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * torch.tensor([1.0, -1.0, 1.0])[:n]
    return x, t, t * torch.rand(n, generator=g)


@torch.no_grad()
def test_velocity_is_sana_at_1000_t_on_the_reference_conditions(parts):
    """The token path equals the reference's encoding (OpenUniConditioner: LLM states -> head) fed to SANA."""
    backbone, prompts, reference = parts
    x, t, tt = inputs()
    v = backbone(x, t, tt, prompts.encode_prompts(PROMPTS))
    caption = reference.encode_prompts(PROMPTS).embeds
    sana = backbone.transformer.sana
    direct = sana(x, caption, t * 1000, target_timestep=tt * 1000, return_dict=False)[0]
    torch.testing.assert_close(v, direct, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_trained_parts_through_the_frozen_llm(parts):
    backbone, prompts, _ = parts
    x, t, tt = inputs()
    backbone(x, t, tt, prompts.encode_prompts(PROMPTS)).square().mean().backward()
    head = backbone.transformer.query_head
    for name in ("meta_queries", "connector.layers.0.self_attn.q_proj.weight", "projector.weight"):
        assert head.get_parameter(name).grad.abs().sum() > 0, name
    assert backbone.transformer.sana.time_embed_2.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.llm.parameters())
    # The LLM is not part of the module: no parameter, no state-dict key, so no optimizer slot, EMA or checkpoint.
    llm_ids = {id(p) for p in backbone.llm.parameters()}
    assert not llm_ids & {id(p) for p in backbone.parameters()}
    assert all(k.startswith("transformer.") for k in backbone.state_dict())


def test_a_frozen_head_builds_no_graph_through_the_llm(parts):
    backbone, prompts, _ = parts
    backbone.transformer.query_head.requires_grad_(False)
    assert not backbone.caption_states(prompts.encode_prompts(PROMPTS)).requires_grad


@torch.no_grad()
def test_repeated_prompts_run_the_llm_once_each(parts):
    backbone, prompts, _ = parts
    rows = []
    handle = backbone.llm.register_forward_hook(lambda m, a, kw, out: rows.append(kw["inputs_embeds"].shape[0]),
                                                with_kwargs=True)
    cond, uncond = prompts.encode_pair(PROMPTS)
    both = OpenUniPrompt.cat([cond, uncond])
    x, t, tt = inputs()
    v = backbone(torch.cat([x, x]), torch.cat([t, t]), torch.cat([tt, tt]), both)
    handle.remove()
    assert rows == [3]  # "a cat" twice and the negative prompt three times: three distinct prompts
    torch.testing.assert_close(v[:3], backbone(x, t, tt, cond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v[3:], backbone(x, t, tt, uncond), rtol=1e-5, atol=1e-5)


def test_inputs_are_checked(parts):
    backbone, prompts, _ = parts
    x, t, tt = inputs()
    cond = prompts.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="x_t must be"):
        backbone(x[:, :3], t, tt, cond)
    with pytest.raises(ValueError, match="t and tt must have shape"):
        backbone(x, t, tt[:2], cond)
    with pytest.raises(TypeError, match="OpenUniPrompt of 3 rows"):
        backbone(x, t, tt, cond.index(slice(0, 2)))
    with pytest.raises(TypeError, match="OpenUniPrompt"):
        backbone(x, t, tt, OpenUniCondition(torch.randn(3, 8, 24)))


def test_widths_that_do_not_fit_are_refused(parts):
    backbone, _, _ = parts
    llm = backbone.llm
    from twinflow.backbones.openuni.query_head import OpenUniQueryHead
    from twinflow.backbones.openuni.tiny_encoders import tiny_query_head_config

    narrow = OpenUniQueryHead(dataclasses.replace(tiny_query_head_config(), caption_channels=16))
    with pytest.raises(ValueError, match="caption_channels"):
        OpenUniBackbone(OpenUniGenerator(twin_sana(), narrow), llm, dtype=torch.float32)


def test_a_copy_shares_the_frozen_llm_and_copies_the_trained_parts(parts):
    """Dense teachers deepcopy the backbone: the LLM (outside the module tree) is shared, not copied."""
    import copy

    backbone, prompts, _ = parts
    twin = copy.deepcopy(backbone)
    assert twin.llm is backbone.llm
    assert twin.transformer is not backbone.transformer
    x, t, tt = inputs()
    cond = prompts.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, tt, cond), backbone(x, t, tt, cond), rtol=0, atol=0)
