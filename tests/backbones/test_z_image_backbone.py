"""ZImageBackbone: the reference's time mapping and sign, the condition, and the LoRA targets."""
import pytest
import torch

from twinflow.backbones.z_image import ZImageCondition
from twinflow.backbones.z_image.backbone import ZImageBackbone, to_z_image_time
from twinflow.backbones.z_image.lora import LORA_TARGET_MODULES
from twinflow.method.conditioning import cat_conditions, index_condition

from t2i_helpers import assert_input_checks, lora_adapted_modules
from z_image_helpers import CFG, plain_copy, twin_model


def make_cond(lengths=(5, 9, 3), seed=0):
    """Right-padded captions with noise in the padding, so that a leak of padding would show."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return ZImageCondition(torch.randn(len(lengths), length, CFG["cap_feat_dim"], generator=g), mask)


def test_time_mapping_is_the_references_including_zero():
    t = torch.tensor([0.0, 0.3, -0.3, 1.0, -1.0, 0.75])
    assert to_z_image_time(t).dtype == torch.float64
    t64 = t.double()
    expected = torch.tensor([0.0, 1 - t64[1], -(1 - t64[1]), 0.0, 0.0, 0.25], dtype=torch.float64)
    assert torch.equal(to_z_image_time(t), expected)  # tt = 0 (the data end) maps to 0, as sign(0) = 0


def test_equal_times_is_minus_the_plain_model_at_one_minus_t():
    """F(x, t, t) is the velocity the pipeline uses: -model(x, 1 - t), with captions trimmed by the mask."""
    model = twin_model(seed=5)
    backbone = ZImageBackbone(model, dtype=torch.float32)
    x = torch.randn(3, CFG["in_channels"], 6, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.25, 0.5])
    cond = make_cond()
    frames = list(x.unsqueeze(2).unbind(0))
    captions = [cond.embeds[i, :n] for i, n in enumerate((5, 9, 3))]
    with torch.no_grad():
        ours = backbone(x, t, t, cond)
        ref = -torch.stack(plain_copy(model)(frames, 1 - t, captions, return_dict=False)[0]).squeeze(2)
        jump = backbone(x, t, torch.zeros(3), cond)
    assert torch.equal(ours, ref) and not torch.equal(jump, ours)


def test_condition_index_cat_and_captions():
    c = make_cond()
    parts = [index_condition(c, slice(0, 1)), index_condition(c, torch.tensor([2, 1]))]
    joined = cat_conditions(parts)
    assert joined.embeds.shape == (3, 9, CFG["cap_feat_dim"])
    assert joined.mask.sum(dim=1).tolist() == [5, 3, 9]
    assert torch.equal(joined.captions()[2], c.embeds[1]) and torch.equal(joined.captions()[1], c.embeds[2, :3])
    assert c.to(torch.bfloat16).embeds.dtype == torch.bfloat16 and c.to(torch.bfloat16).mask.dtype == torch.bool
    with pytest.raises(ValueError, match="needs embeds"):
        ZImageCondition(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_inputs_are_checked():
    backbone = ZImageBackbone(twin_model(), dtype=torch.float32)
    assert_input_checks(backbone, lambda batch: make_cond(tuple(range(1, batch + 1))))


def test_lora_targets_are_found_by_peft():
    model = twin_model(seed=7)
    plain = plain_copy(model)
    peft_model, adapted = lora_adapted_modules(model, LORA_TARGET_MODULES)
    blocks = CFG["n_layers"] + 2 * CFG["n_refiner_layers"]
    assert len(adapted) == blocks * len(LORA_TARGET_MODULES)
    x, t, cond = torch.randn(2, CFG["in_channels"], 4, 4), torch.tensor([0.3, 0.8]), make_cond((2, 4))
    with torch.no_grad():  # peft injected the LoRA layers in place; a fresh adapter (B = 0) is a no-op
        ours = ZImageBackbone(peft_model.base_model.model, dtype=torch.float32)(x, t, t, cond)
        ref = plain(list(x.unsqueeze(2).unbind(0)), 1 - t, cond.captions(), return_dict=False)[0]
        assert torch.equal(ours, -torch.stack(ref).squeeze(2))
