"""TwinFlowSanaTransformer: the dual-time rule, identity with diffusers at t == tt, checkpoints."""
import pytest
import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.normalization import AdaLayerNormSingle

from twinflow.backbones.openuni.tiny import tiny_transformer_config
from twinflow.backbones.openuni.tiny_encoders import build_tiny_transformer
from twinflow.backbones.openuni.transformer import DualTimeRequest, TwinFlowSanaTransformer

from openuni_helpers import plain_sana, sana_inputs, signed_timesteps, twin_sana


@torch.no_grad()
def test_equal_times_is_exactly_plain_diffusers():
    model = twin_sana()
    plain = plain_sana(model)
    t, kw = signed_timesteps(), sana_inputs()
    reference = plain(timestep=t, **kw)[0]
    assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], reference)
    assert torch.equal(model(timestep=t, **kw)[0], reference)
    assert (model(timestep=t, target_timestep=t * 0.3, **kw)[0] - reference).abs().max() > 1e-2


@torch.no_grad()
def test_equal_times_identity_in_bfloat16():
    model = twin_sana()
    plain = plain_sana(model).to(torch.bfloat16)
    model.to(torch.bfloat16)
    t, kw = signed_timesteps(), sana_inputs()
    kw = {**kw, "hidden_states": kw["hidden_states"].bfloat16(), "encoder_hidden_states": kw["encoder_hidden_states"].bfloat16()}
    assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


@torch.no_grad()
def test_both_outputs_get_the_second_embedder_times_t_minus_tt():
    model = twin_sana()
    t, tt = signed_timesteps(seed=1), signed_timesteps(seed=2)
    mod, emb = model.time_embed(DualTimeRequest(t, tt, model._dual_time_embedding), batch_size=3, hidden_dtype=torch.float32)
    mod_1, emb_1 = AdaLayerNormSingle.forward(model.time_embed, t, batch_size=3, hidden_dtype=torch.float32)
    mod_2, emb_2 = model.time_embed_2(tt, batch_size=3, hidden_dtype=torch.float32)
    coefficient = ((t - tt) / 1000)[:, None]
    torch.testing.assert_close(mod, mod_1 + mod_2 * coefficient, rtol=0, atol=0)
    torch.testing.assert_close(emb, emb_1 + emb_2 * coefficient, rtol=0, atol=0)
    assert mod.shape == (3, 6 * 16) and emb.shape == (3, 16)


def test_second_embedder_starts_normal_002_with_zero_biases():
    model = build_tiny_transformer()
    linears = [m for m in model.time_embed_2.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


@torch.no_grad()
def test_single_embedder_mode_feeds_t_minus_half_tt():
    model = twin_sana(twin_embedder=False)
    assert not hasattr(model, "time_embed_2")
    plain = plain_sana(model)
    t, tt, kw = signed_timesteps(), signed_timesteps(seed=3), sana_inputs()
    torch.testing.assert_close(model(timestep=t, target_timestep=tt, **kw)[0], plain(timestep=t - tt / 2, **kw)[0])


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="kernels must be one of"):
        TwinFlowSanaTransformer(**tiny_transformer_config(), kernels="cuda")
    with pytest.raises(ValueError, match="guidance_embeds"):
        TwinFlowSanaTransformer(**tiny_transformer_config(), guidance_embeds=True)
    model = build_tiny_transformer()
    with pytest.raises(ValueError, match="target_timestep shape"):
        model(timestep=torch.ones(3), target_timestep=torch.ones(2), **sana_inputs())


@torch.no_grad()
def test_from_pretrained_round_trip(tmp_path):
    model = twin_sana()
    model.save_pretrained(tmp_path)
    loaded = TwinFlowSanaTransformer.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    t, kw = signed_timesteps(), sana_inputs()
    assert torch.equal(loaded(timestep=t, target_timestep=t / 3, **kw)[0], model(timestep=t, target_timestep=t / 3, **kw)[0])


@torch.no_grad()
def test_plain_sana_checkpoint_gets_a_fresh_second_embedder(tmp_path):
    plain = plain_sana(twin_sana())
    plain.save_pretrained(tmp_path)
    loaded, info = TwinFlowSanaTransformer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == []
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.count_nonzero(loaded.time_embed_2.linear.bias) == 0
    assert 0.01 < loaded.time_embed_2.linear.weight.std() < 0.03
    t, kw = signed_timesteps(), sana_inputs()
    assert torch.equal(loaded.eval()(timestep=t, target_timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


def test_checkpoint_with_part_of_the_second_embedder_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    twin_sana().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if k != "time_embed_2.linear.bias"}
    save_file(state, str(path))
    with pytest.raises(ValueError, match="only part of time_embed_2"):
        TwinFlowSanaTransformer.from_pretrained(tmp_path)


def test_plain_diffusers_class_is_the_parent():
    assert issubclass(TwinFlowSanaTransformer, SanaTransformer2DModel)
