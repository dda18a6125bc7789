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


def _embedding_error_bound(embedder, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E(time), bound)``: a bound on |kernel - eager| for one float32 ``QwenTimestepProjEmbeddings``.

    Both implementations compute the same float32 dot products in different orders (torch's matmul
    vs the kernel's tl.dot tiles). A K-term float32 dot product plus bias, in any order, is within
    ``K eps sum_i |a_i b_i|`` of the exact value (eps = 2**-24, K additions each rounding once;
    first-order bound, K eps << 1), so two orders differ by at most twice that. Error sources, in order:
    sinusoid (numpy vs torch / libdevice sin, cos: <= 2 ulp of values <= 1, so <= 2 eps each),
    Linear1 (K = C + 1), SiLU (Lipschitz <= 1.1, plus one rounding of each side), Linear2 (K = D + 1,
    and the Linear1 error carried through |W2|)."""
    from twinflow.kernels.dual_time_embedding import timestep_sinusoid

    eps = 2.0**-24
    w1, b1 = embedder.timestep_embedder.linear_1.weight, embedder.timestep_embedder.linear_1.bias
    w2, b2 = embedder.timestep_embedder.linear_2.weight, embedder.timestep_embedder.linear_2.bias
    x = timestep_sinusoid(time.float(), w1.shape[1])
    h = torch.nn.functional.silu(x @ w1.T + b1)
    d_pre = 2 * (w1.shape[1] + 1) * eps * (x.abs() @ w1.abs().T + b1.abs()) + 2 * eps * (w1.abs().sum(1) * 2)
    d_h = 1.1 * d_pre + 2 * eps * h.abs()
    d_e = 2 * (w2.shape[1] + 1) * eps * (h.abs() @ w2.abs().T + b2.abs()) + d_h @ w2.abs().T
    return h @ w2.T + b2, d_e


@torch.no_grad()
def test_triton_kernels_match_eager():
    """The fused dual-time embedding inside the transformer (issue 11 item 4).

    The fused and eager outputs differ in float32 by up to ~3e-5 (max |out| ~ 38) at this size, and by
    whatever the platform's summation orders give elsewhere, so a fixed tolerance on the output was
    never derived from anything (atol 1e-5 failed with today's versions, issue 11). The gap is
    accumulation order, not a kernel error: (1) given the same time embedding, the transformer's output
    is bitwise the same, so the whole difference enters through the embedding; (2) the embedding
    differs from eager by less than the rounding bound of its dot products (_embedding_error_bound:
    measured <= 4e-4 of the bound, max |diff| ~ 8e-6 of values up to 20). A wrong weight, a missing
    bias or a dropped term moves the embedding by O(|E|), thousands of times the bound."""
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
    captured = {}

    def capture(model, name):
        real = model._dual_time_embedding
        model._dual_time_embedding = lambda *a: captured.setdefault(name, real(*a))

    capture(eager, "eager")
    capture(fused, "fused")
    out_fused = fused(timestep=t, target_timestep=tt, **kw)[0]
    eager(timestep=t, target_timestep=tt, **kw)
    temb_eager, temb_fused = captured["eager"], captured["fused"]
    # (1) Everything after the embedding is the same computation.
    eager._dual_time_embedding = lambda *a: temb_fused
    assert torch.equal(eager(timestep=t, target_timestep=tt, **kw)[0], out_fused)
    # (2) The embedding: E1(t) + E2(tt) (t - tt), each term within its bound, plus the combine's
    # roundings (a product and a sum, both sides: 4 eps of the terms' magnitudes).
    e1, bound1 = _embedding_error_bound(eager.time_text_embed, t)
    e2, bound2 = _embedding_error_bound(eager.time_text_embed_2, tt)
    delta = (t - tt).abs()[:, None]
    bound = bound1 + bound2 * delta + 4 * 2.0**-24 * (e1.abs() + (e2 * delta).abs())
    assert temb_fused.shape == temb_eager.shape == bound.shape
    assert ((temb_fused - temb_eager).abs() <= bound).all()
