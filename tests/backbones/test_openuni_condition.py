"""OpenUniCondition: rows, concatenation and device/dtype moves."""
import pytest
import torch

from twinflow.backbones.openuni import OpenUniCondition


def cond(batch, length=4, width=3, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    return OpenUniCondition(torch.randn(batch, length, width, generator=g), mask)


def test_index_and_cat_without_masks_stay_maskless():
    a, b = cond(2), cond(3, seed=1)
    both = OpenUniCondition.cat([a, b])
    assert both.mask is None and len(both) == 5
    assert torch.equal(both.embeds, torch.cat([a.embeds, b.embeds]))
    rows = both.index(torch.tensor([False, True, True, False, True]))
    assert torch.equal(rows.embeds, both.embeds[[1, 2, 4]]) and rows.mask is None
    assert torch.equal(both.index(slice(2, None)).embeds, b.embeds)


def test_cat_pads_unequal_lengths_with_a_false_mask():
    a, b = cond(1, length=2), cond(2, length=4, seed=1, mask=torch.tensor([[True] * 4, [True, True, False, False]]))
    both = OpenUniCondition.cat([a, b])
    assert both.embeds.shape == (3, 4, 3)
    assert both.mask.tolist() == [[True, True, False, False], [True] * 4, [True, True, False, False]]
    assert torch.equal(both.embeds[0, 2:], torch.zeros(2, 3)) and torch.equal(both.embeds[0, :2], a.embeds[0])
    assert torch.equal(both.index(torch.tensor([2])).mask, b.mask[1:])


def test_to_keeps_the_mask_bool_and_checks_shapes():
    c = cond(2, mask=torch.ones(2, 4, dtype=torch.long))
    assert c.mask.dtype == torch.bool
    moved = c.to(torch.bfloat16)
    assert moved.embeds.dtype == torch.bfloat16 and moved.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="mask"):
        OpenUniCondition(torch.zeros(2, 4, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="embeds"):
        OpenUniCondition(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        OpenUniCondition.cat([])
