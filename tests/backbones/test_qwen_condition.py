"""QwenCondition: batch indexing and concatenation with text re-padding."""
import pytest
import torch

from twinflow.backbones.qwen_image import QwenCondition
from twinflow.method.conditioning import cat_conditions, index_condition


def cond(batch, length, ref=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -1] = False
    refs = torch.randn(batch, 4, 6, 8, generator=g) if ref else None
    return QwenCondition(torch.randn(batch, length, 8, generator=g), mask, refs)


def test_cat_pads_text_to_longest_with_false_mask():
    a, b = cond(2, 3, seed=1), cond(1, 5, seed=2)
    c = cat_conditions([a, b])
    assert len(c) == 3 and c.embeds.shape == (3, 5, 8) and c.mask.dtype == torch.bool
    assert torch.equal(c.embeds[:2, :3], a.embeds) and torch.equal(c.embeds[2:], b.embeds)
    assert torch.equal(c.mask[:2, :3], a.mask) and not c.mask[:2, 3:].any()
    assert torch.equal(c.embeds[:2, 3:], torch.zeros(2, 2, 8))


def test_index_and_cat_round_trip_with_reference_latents():
    c = cond(4, 3, ref=True)
    idx = torch.tensor([True, False, True, True])
    parts = [index_condition(c, idx), index_condition(c, ~idx)]
    assert len(parts[0]) == 3 and torch.equal(parts[0].ref_latents, c.ref_latents[idx])
    joined = QwenCondition.cat(parts)
    order = torch.cat([idx.nonzero()[:, 0], (~idx).nonzero()[:, 0]])
    assert torch.equal(joined.embeds, c.embeds[order]) and torch.equal(joined.ref_latents, c.ref_latents[order])
    assert torch.equal(index_condition(c, slice(1, 3)).mask, c.mask[1:3])


def test_to_casts_floats_and_keeps_mask_bool():
    c = cond(2, 3, ref=True).to(torch.bfloat16)
    assert c.embeds.dtype == torch.bfloat16 and c.ref_latents.dtype == torch.bfloat16 and c.mask.dtype == torch.bool


@pytest.mark.parametrize(
    "embeds, mask, ref, match",
    [
        (torch.zeros(2, 3), torch.ones(2, 3), None, "embeds must be"),
        (torch.zeros(2, 3, 4), torch.ones(2, 4), None, "mask must be"),
        (torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 4, 4), "ref_latents must be"),
        (torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(3, 4, 4, 4), "batch 3"),
    ],
)
def test_bad_shapes_are_named(embeds, mask, ref, match):
    with pytest.raises(ValueError, match=match):
        QwenCondition(embeds, mask, ref)


def test_cat_refuses_mixing_with_and_without_reference():
    with pytest.raises(ValueError, match="ref_latents"):
        QwenCondition.cat([cond(1, 2, ref=True), cond(1, 2)])
