"""OpenUniBackbone: F(x_t, t, tt, cond) on SANA, times in SANA's units, with or without the query head."""
import pytest
import torch

from twinflow.backbones.openuni import OpenUniCondition
from twinflow.backbones.openuni.backbone import OpenUniBackbone
from twinflow.backbones.openuni.tiny import TINY_LLM_HIDDEN_SIZE, TINY_NUM_QUERIES
from twinflow.backbones.openuni.tiny_encoders import build_tiny_query_head

from openuni_helpers import CAPTION, twin_sana


def batch(n=3, width=CAPTION, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * torch.tensor([1.0, -1.0, 1.0])[:n]
    return x, t, t * torch.rand(n, generator=g), OpenUniCondition(torch.randn(n, TINY_NUM_QUERIES, width, generator=g))


@torch.no_grad()
def test_velocity_is_the_transformer_at_1000_t():
    model = twin_sana()
    x, t, tt, cond = batch()
    v = OpenUniBackbone(model, dtype=torch.float32)(x, t, tt, cond)
    direct = model(x, cond.embeds, t * 1000, target_timestep=tt * 1000, return_dict=False)[0]
    assert v.shape == x.shape and torch.equal(v, direct)


@torch.no_grad()
def test_an_all_true_mask_changes_nothing():
    backbone = OpenUniBackbone(twin_sana(), dtype=torch.float32)
    x, t, tt, cond = batch()
    masked = OpenUniCondition(cond.embeds, torch.ones(3, TINY_NUM_QUERIES, dtype=torch.bool))
    torch.testing.assert_close(backbone(x, t, tt, masked), backbone(x, t, tt, cond))


def test_backbone_that_owns_the_head_trains_it():
    head = build_tiny_query_head()
    backbone = OpenUniBackbone(twin_sana(), dtype=torch.float32, query_head=head)
    x, t, tt, cond = batch(width=TINY_LLM_HIDDEN_SIZE)
    v = backbone(x, t, tt, cond)
    with torch.no_grad():
        projected = OpenUniCondition(head(cond.embeds))
        assert torch.equal(v, OpenUniBackbone(backbone.transformer, dtype=torch.float32)(x, t, tt, projected))
    v.square().mean().backward()
    for name in ("connector.layers.0.self_attn.q_proj.weight", "projector.weight"):
        assert head.get_parameter(name).grad.abs().sum() > 0, name
    assert backbone.transformer.time_embed_2.linear.weight.grad.abs().sum() > 0


def test_inputs_are_checked():
    backbone = OpenUniBackbone(twin_sana(), dtype=torch.float32)
    x, t, tt, cond = batch()
    with pytest.raises(ValueError, match="channels|x_t must be"):
        backbone(x[:, :3], t, tt, cond)
    with pytest.raises(ValueError, match="t and tt must have shape"):
        backbone(x, t, tt[:2], cond)
    with pytest.raises(TypeError, match="OpenUniCondition of 3 rows"):
        backbone(x, t, tt, cond.index(slice(0, 2)))
    with pytest.raises(ValueError, match="projected states"):
        backbone(x, t, tt, batch(width=TINY_LLM_HIDDEN_SIZE)[3])
    with pytest.raises(TypeError, match="OpenUniCondition"):
        backbone(x, t, tt, cond.embeds)
