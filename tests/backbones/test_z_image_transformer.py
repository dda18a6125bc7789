"""TwinFlowZImageTransformer: the reference's dual-time rule, identity with diffusers, the published layout."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer

from t2i_helpers import drop_from_checkpoint
from z_image_helpers import CFG, E2_KEYS, plain_copy, run, twin_model

T = torch.tensor([0.3, 0.85, 1.0])


def test_equal_times_is_exactly_plain_diffusers():
    """At t == tt: E1(|t| s) in float64 rounds to diffusers' float32 E1(t s); E2 * 0 adds nothing."""
    model = twin_model()
    ref = run(plain_copy(model), T)
    assert torch.equal(run(model, T, T.clone()), ref)
    assert torch.equal(run(model, T), ref)
    assert torch.equal(run(model, -T, -T), ref)  # E1 sees |t|


def test_dual_time_embedding_is_the_reference_rule_in_float64():
    model = twin_model(seed=1)
    t, tt = torch.tensor([0.9, -0.6, 0.2]), torch.tensor([0.4, 0.6, 0.0])
    seen = []
    handle = model.t_embedder.register_forward_hook(lambda m, a, out: seen.append(out))
    run(model, t, tt)
    handle.remove()
    t64, tt64 = t.double(), tt.double()
    with torch.no_grad():
        e1 = model.t_embedder(t64.abs() * 1000)
        e2 = model.t_embedder_2(tt64 * 1000 - t64 * 1000)
    assert seen[0].dtype == torch.float64
    assert torch.equal(seen[0], e1 + e2 * (t64 - tt64).abs()[:, None])


def test_e2_is_a_copy_of_e1_with_the_published_names():
    model = TwinFlowZImageTransformer(**CFG)
    keys = [k for k in model.state_dict() if k.startswith("t_embedder_2.")]
    assert keys == E2_KEYS
    for name in E2_KEYS:
        assert torch.equal(model.state_dict()[name], model.state_dict()[name.replace("_2.", ".", 1)])


def test_published_key_layout_loads_without_remapping(tmp_path):
    """A checkpoint as published: the base model's keys and config, plus t_embedder_2.* (safetensors)."""
    model = twin_model(seed=2)
    plain_copy(model).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    assert not any(k.startswith("t_embedder_2.") for k in state)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("t_embedder_2.")})
    save_file(state, path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "ZImageTransformer2DModel"
    loaded, info = TwinFlowZImageTransformer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    tt = torch.tensor([0.1, 0.5, 0.0])
    assert torch.equal(run(loaded, T, tt), run(model, T, tt))


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_plain_checkpoint_copies_e1_into_e2(tmp_path, low_cpu_mem_usage):
    plain = plain_copy(twin_model(seed=3))
    plain.save_pretrained(tmp_path)
    model = TwinFlowZImageTransformer.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    for name in E2_KEYS:
        source = plain.state_dict()[name.replace("_2.", ".", 1)]
        assert model.state_dict()[name].device.type == "cpu" and torch.equal(model.state_dict()[name], source)
    assert torch.equal(run(model, T, T), run(plain, T))


def test_save_load_round_trip_and_partial_twin_error(tmp_path):
    model = twin_model(seed=4)
    model.save_pretrained(tmp_path)
    loaded = TwinFlowZImageTransformer.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    drop_from_checkpoint(tmp_path, "t_embedder_2.mlp.2.bias")
    with pytest.raises(ValueError, match="only part of t_embedder_2"):
        TwinFlowZImageTransformer.from_pretrained(tmp_path)
