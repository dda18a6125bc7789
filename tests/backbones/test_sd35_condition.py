"""SD3Condition: batch indexing and concatenation (equal lengths only), casting, validation."""
import pytest
import torch

from twinflow.backbones.sd35 import SD3Condition
from twinflow.method.conditioning import cat_conditions, index_condition


def cond(batch, length=5, mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.arange(length)[None].expand(batch, length) < 3 if mask else None
    return SD3Condition(torch.randn(batch, length, 8, generator=g), torch.randn(batch, 6, generator=g), m)


def test_index_and_cat_round_trip():
    c = cond(4)
    idx = torch.tensor([True, False, True, True])
    parts = [index_condition(c, idx), index_condition(c, ~idx)]
    assert len(parts[0]) == 3 and torch.equal(parts[0].pooled, c.pooled[idx])
    joined = cat_conditions(parts)
    order = torch.cat([idx.nonzero()[:, 0], (~idx).nonzero()[:, 0]])
    for name in ("embeds", "pooled", "mask"):
        assert torch.equal(getattr(joined, name), getattr(c, name)[order])
    assert index_condition(cond(3, mask=False), slice(0, 2)).mask is None


def test_cat_refuses_different_lengths_and_mixed_masks():
    with pytest.raises(ValueError, match="text lengths"):
        SD3Condition.cat([cond(1, 5), cond(1, 6)])
    with pytest.raises(ValueError, match="with and without a mask"):
        SD3Condition.cat([cond(1), cond(1, mask=False)])


def test_to_casts_floats_and_keeps_mask_bool():
    c = cond(2).to(torch.bfloat16)
    assert c.embeds.dtype == c.pooled.dtype == torch.bfloat16 and c.mask.dtype == torch.bool


@pytest.mark.parametrize(
    "embeds, pooled, mask, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), None, r"\(2, 3\), \(2, 4\), None"),
        (torch.zeros(2, 3, 4), torch.zeros(3, 4), None, r"\(2, 3, 4\), \(3, 4\), None"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.ones(2, 4), r"\(2, 3, 4\), \(2, 4\), \(2, 4\)"),
    ],
)
def test_validation(embeds, pooled, mask, match):
    with pytest.raises(ValueError, match=match):
        SD3Condition(embeds, pooled, mask)
