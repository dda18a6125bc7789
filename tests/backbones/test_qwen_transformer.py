"""TwinFlowQwenImageTransformer: dual-time embedding, identity with diffusers, checkpoints."""
import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

from qwen_helpers import TEXT_DIM, plain_copy, twin_model

PUBLISHED_TWIN_KEYS = [
    "time_text_embed_2.timestep_embedder.linear_1.weight",
    "time_text_embed_2.timestep_embedder.linear_1.bias",
    "time_text_embed_2.timestep_embedder.linear_2.weight",
    "time_text_embed_2.timestep_embedder.linear_2.bias",
]


def inputs(batch=3, seed=0, ref=False):
    """Packed transformer inputs: 4x4 patch grid (plus a 2x3 reference grid), padded text."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, 4)] + ([(1, 2, 3)] if ref else [])
    tokens = sum(h * w for _, h, w in shapes)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, TEXT_DIM, generator=g),
        encoder_hidden_states_mask=mask,
        img_shapes=[shapes] * batch,
        return_dict=False,
    )


def signed_times(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g) * torch.tensor([1.0, -1.0, 1.0])[:batch]
    return t


@torch.no_grad()
def test_equal_times_is_exactly_plain_diffusers():
    model = twin_model()
    plain = plain_copy(model)
    e1 = model.time_text_embed.timestep_embedder.linear_1.weight
    assert not torch.equal(e1, model.time_text_embed_2.timestep_embedder.linear_1.weight)
    t, kw = signed_times(), inputs()
    reference = plain(timestep=t, **kw)[0]
    assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], reference)
    assert torch.equal(model(timestep=t, **kw)[0], reference)
    other = model(timestep=t, target_timestep=t * 0.3, **kw)[0]
    assert (other - reference).abs().max() > 1e-2


@torch.no_grad()
def test_equal_times_identity_holds_with_zero_cond_t_edit_model():
    model = twin_model(zero_cond_t=True)
    plain = plain_copy(model, zero_cond_t=True)
    t, kw = signed_times(), inputs(ref=True)
    assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


@torch.no_grad()
def test_dual_time_embedding_formula():
    """temb = E1(t) + E2(tt)(t - tt), checked through the parent's own embedding modules."""
    model = twin_model()
    t, tt = torch.tensor([0.9, -0.4]), torch.tensor([0.2, -0.1])
    hidden = torch.zeros(2, 1)
    request_temb = model.time_text_embed(t, hidden, _request(model, tt))
    e1 = model.time_text_embed(t, hidden)
    e2 = model.time_text_embed_2(tt, hidden)
    torch.testing.assert_close(request_temb, e1 + e2 * (t - tt)[:, None], rtol=0, atol=0)


def _request(model, tt):
    from twinflow.backbones.qwen_image.transformer import DualTimeRequest

    return DualTimeRequest(tt, None, model._dual_time_embedding)


@torch.no_grad()
def test_single_embedder_mode_feeds_t_minus_half_tt():
    model = twin_model(twin_embedder=False)
    assert not hasattr(model, "time_text_embed_2")
    plain = plain_copy(model)
    t, kw = signed_times(), inputs()
    tt = t * 0.25
    assert torch.equal(model(timestep=t, target_timestep=tt, **kw)[0], plain(timestep=t - tt / 2, **kw)[0])


def test_second_embedder_gets_gradient_only_when_times_differ():
    model = twin_model()
    t, kw = signed_times(), inputs()
    for tt, expect in ((t, False), (t * 0.5, True)):
        model.zero_grad()
        model(timestep=t, target_timestep=tt, **kw)[0].square().mean().backward()
        grad = model.time_text_embed_2.timestep_embedder.linear_2.weight.grad
        assert (grad is not None and grad.abs().max() > 0) == expect


def test_published_key_names_and_copy_initialisation():
    model = TwinFlowQwenImageTransformer(**tiny_transformer_config())
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("time_text_embed_2.")] == PUBLISHED_TWIN_KEYS
    plain_keys = set(QwenImageTransformer2DModel(**tiny_transformer_config()).state_dict())
    assert set(keys) - plain_keys == set(PUBLISHED_TWIN_KEYS) and plain_keys <= set(keys)
    for name in PUBLISHED_TWIN_KEYS:
        assert torch.equal(model.state_dict()[name], model.state_dict()[name.replace("_2.", ".", 1)])


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_from_plain_checkpoint_copies_e1_into_e2(tmp_path, low_cpu_mem_usage):
    plain = plain_copy(twin_model(seed=3))
    plain.save_pretrained(tmp_path)
    model = TwinFlowQwenImageTransformer.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    state = model.state_dict()
    for name in PUBLISHED_TWIN_KEYS:
        source = plain.state_dict()[name.replace("_2.", ".", 1)]
        assert state[name].device.type == "cpu" and torch.equal(state[name], source)
    kw, t = inputs(), signed_times()
    with torch.no_grad():
        assert torch.equal(model(timestep=t, target_timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


def test_save_load_round_trip_keeps_trained_e2(tmp_path):
    model = twin_model(seed=5, twin_embedder=True)
    model.save_pretrained(tmp_path)
    loaded, info = TwinFlowQwenImageTransformer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert loaded.config.twin_embedder and loaded.config.kernels == "eager"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_partial_twin_checkpoint_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    twin_model().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["time_text_embed_2.timestep_embedder.linear_2.bias"]
    save_file(state, path)
    with pytest.raises(ValueError, match="only part of time_text_embed_2"):
        TwinFlowQwenImageTransformer.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="kernels"):
        TwinFlowQwenImageTransformer(**tiny_transformer_config(), kernels="cuda")
    model = twin_model()
    with pytest.raises(ValueError, match="target_timestep shape"):
        model(timestep=torch.zeros(3), target_timestep=torch.zeros(2), **inputs())


@torch.no_grad()
def test_triton_kernels_match_eager():
    pytest.importorskip("twinflow.kernels.dual_time_embedding", reason="kernels/dual_time_embedding.py not written yet")
    from twinflow.kernels._common import interpreter_enabled

    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    eager = twin_model(seed=7)
    fused = TwinFlowQwenImageTransformer(**tiny_transformer_config(), kernels="triton").eval()
    fused.load_state_dict(eager.state_dict())
    assert set(fused.state_dict()) == set(eager.state_dict())
    t, kw = signed_times(), inputs()
    tt = t * torch.tensor([0.5, 1.0, 0.0])
    torch.testing.assert_close(fused(timestep=t, target_timestep=tt, **kw)[0],
                               eager(timestep=t, target_timestep=tt, **kw)[0], rtol=1e-5, atol=1e-5)
