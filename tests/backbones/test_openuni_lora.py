"""SANA LoRA targets: peft finds every one of them on the tiny model, and only them."""
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from twinflow.backbones.openuni.lora import SANA_LORA_TARGETS, TIME_EMBED_2_LINEARS

from openuni_helpers import sana_inputs, signed_timesteps, twin_sana


def wrapped_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


def test_every_target_is_found_and_time_embed_2_is_left_alone():
    model = get_peft_model(twin_sana(), LoraConfig(r=2, lora_alpha=2, target_modules=SANA_LORA_TARGETS))
    names = wrapped_names(model)
    for target in SANA_LORA_TARGETS:
        assert any(n.endswith("." + target) for n in names), target
    assert sum(".attn1.to_q" in n for n in names) == 2  # one per block
    assert not any("time_embed_2" in n for n in names)
    assert not any(n.endswith(("caption_projection.linear_1", "proj_out")) for n in names)


def test_time_embed_2_linears_are_targets_when_asked():
    model = get_peft_model(twin_sana(), LoraConfig(r=2, target_modules=SANA_LORA_TARGETS + TIME_EMBED_2_LINEARS))
    assert sum("time_embed_2" in n for n in wrapped_names(model)) == len(TIME_EMBED_2_LINEARS)


@torch.no_grad()
def test_fresh_adapter_leaves_the_output_unchanged():
    base = twin_sana()
    t, kw = signed_timesteps(), sana_inputs()
    reference = base(timestep=t, target_timestep=t / 2, **kw)[0]
    base.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=SANA_LORA_TARGETS, init_lora_weights=True))
    assert torch.equal(base(timestep=t, target_timestep=t / 2, **kw)[0], reference)
