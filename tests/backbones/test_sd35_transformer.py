"""TwinFlowSD3Transformer: dual-time embedding, identity with diffusers, checkpoints."""
import pytest
import torch

from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer

from sd35_helpers import CFG, E2_KEYS, inputs, plain_copy, signed_times, twin_model
from t2i_helpers import drop_from_checkpoint


def captured_temb(model, **kw):
    seen = []
    handle = model.time_text_embed.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(**kw)
    handle.remove()
    return seen[0]


def test_equal_times_is_exactly_plain_diffusers():
    """At T == TT the extra term is E2 * 0 (E2 finite, here with large random weights): bit-identical."""
    model = twin_model()
    plain = plain_copy(model)
    kw, t = inputs(), signed_times()
    with torch.no_grad():
        ours = model(timestep=t, target_timestep=t.clone(), **kw)[0]
        ref = plain(timestep=t, **kw)[0]
        unchanged = model(timestep=t, **kw)[0]
    assert torch.equal(ours, ref) and torch.equal(unchanged, ref)


def test_dual_time_embedding_formula():
    model = twin_model(seed=1)
    kw, t = inputs(seed=1), signed_times(seed=1)
    tt = t * torch.tensor([0.5, 0.25, -0.3])
    temb = captured_temb(model, timestep=t, target_timestep=tt, **kw)
    pooled = kw["pooled_projections"]
    with torch.no_grad():
        e1 = model.time_text_embed(t, pooled)
        e2 = model.time_text_embed_2(tt, pooled)
    assert torch.equal(temb, e1 + e2 * ((t - tt) / 1000).unsqueeze(-1))
    assert (temb - e1).abs().max() > 1e-3


def test_single_embedder_mode_feeds_t_minus_half_tt():
    model = twin_model(seed=2, twin_embedder=False)
    assert not hasattr(model, "time_text_embed_2")
    kw, t = inputs(seed=2), signed_times(seed=2)
    tt = 0.4 * t
    with torch.no_grad():
        ours = model(timestep=t, target_timestep=tt, **kw)[0]
        ref = plain_copy(model)(timestep=t - tt / 2, **kw)[0]
    assert torch.equal(ours, ref)


def test_e2_initialisation_is_normal_002_with_zero_biases():
    torch.manual_seed(0)
    e2 = TwinFlowSD3Transformer(**{**CFG, "num_attention_heads": 4, "attention_head_dim": 32}).time_text_embed_2
    weights = torch.cat([p.flatten() for n, p in e2.named_parameters() if n.endswith("weight")])
    biases = [p for n, p in e2.named_parameters() if n.endswith("bias")]
    assert abs(weights.mean().item()) < 2e-3 and abs(weights.std().item() - 0.02) < 1e-3
    assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_save_load_round_trip(tmp_path):
    model = twin_model(seed=3)
    model.save_pretrained(tmp_path)
    loaded, info = TwinFlowSD3Transformer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and loaded.config.twin_embedder
    assert [k for k in loaded.state_dict() if k.startswith("time_text_embed_2.")] == E2_KEYS
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_plain_checkpoint_gets_a_normal_e2_and_stays_exact(tmp_path, low_cpu_mem_usage):
    plain = plain_copy(twin_model(seed=4))
    plain.save_pretrained(tmp_path)
    model, info = TwinFlowSD3Transformer.from_pretrained(
        tmp_path, low_cpu_mem_usage=low_cpu_mem_usage, output_loading_info=True
    )
    assert info["missing_keys"] == []
    e2 = dict(model.time_text_embed_2.named_parameters())
    assert all(p.device.type == "cpu" for p in e2.values())
    assert all(torch.count_nonzero(p) == 0 for n, p in e2.items() if n.endswith("bias"))
    assert 0.01 < e2["timestep_embedder.linear_1.weight"].std() < 0.03
    kw, t = inputs(seed=4), signed_times(seed=4)
    with torch.no_grad():
        assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


def test_partial_twin_checkpoint_is_an_error(tmp_path):
    twin_model().save_pretrained(tmp_path)
    drop_from_checkpoint(tmp_path, "time_text_embed_2.text_embedder.linear_2.bias")
    with pytest.raises(ValueError, match="only part of time_text_embed_2"):
        TwinFlowSD3Transformer.from_pretrained(tmp_path)


def test_target_timestep_shape_is_checked():
    model = twin_model()
    t = signed_times()
    with pytest.raises(ValueError, match="must equal the timestep.s shape"):
        model(timestep=t, target_timestep=t[:2], **inputs())
