"""SD3Backbone: F(x_t, t, tt, cond) on SD3 latents, and the LoRA target modules through peft."""
import torch

from twinflow.backbones.sd35 import SD3Condition
from twinflow.backbones.sd35.backbone import SD3Backbone
from twinflow.backbones.sd35.lora import LORA_TARGET_MODULES

from sd35_helpers import CFG, plain_copy, twin_model
from t2i_helpers import assert_input_checks, lora_adapted_modules


def make_cond(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SD3Condition(
        torch.randn(batch, 7, CFG["joint_attention_dim"], generator=g),
        torch.randn(batch, CFG["pooled_projection_dim"], generator=g),
    )


def test_equal_times_is_the_plain_model_at_1000_t():
    model = twin_model(seed=5)
    backbone = SD3Backbone(model, dtype=torch.float32)
    x = torch.randn(3, CFG["in_channels"], 6, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, -0.25, 1.0])
    cond = make_cond()
    with torch.no_grad():
        ours = backbone(x, t, t, cond)
        ref = plain_copy(model)(x, cond.embeds, cond.pooled, 1000 * t, return_dict=False)[0]
        jump = backbone(x, t, torch.zeros(3), cond)
    assert torch.equal(ours, ref) and not torch.equal(jump, ours)


def test_bfloat16_compute_returns_the_input_dtype():
    backbone = SD3Backbone(twin_model(seed=6).to(torch.bfloat16), dtype=torch.bfloat16)
    x = torch.randn(2, CFG["in_channels"], 4, 4)
    with torch.no_grad():
        out = backbone(x, torch.tensor([0.5, 0.9]), torch.tensor([0.0, 0.3]), make_cond(2))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()


def test_inputs_are_checked():
    assert_input_checks(SD3Backbone(twin_model(), dtype=torch.float32), make_cond)


def test_lora_targets_are_found_by_peft():
    model = twin_model(seed=7)
    plain = plain_copy(model)
    peft_model, adapted = lora_adapted_modules(model, LORA_TARGET_MODULES)
    assert not any(".attn2." in name for name in adapted)
    # blocks x 8 projections (the last block has no context output) + E1's and E2's timestep MLPs
    assert len(adapted) == CFG["num_layers"] * 8 - 1 + 4
    x, t, cond = torch.randn(2, CFG["in_channels"], 4, 4), torch.tensor([0.3, 0.8]), make_cond(2)
    with torch.no_grad():  # peft injected the LoRA layers in place; a fresh adapter (B = 0) is a no-op
        ours = SD3Backbone(peft_model.base_model.model, dtype=torch.float32)(x, t, t, cond)
        assert torch.equal(ours, plain(x, cond.embeds, cond.pooled, 1000 * t, return_dict=False)[0])
