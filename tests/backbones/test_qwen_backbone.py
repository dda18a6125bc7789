"""QwenImageBackbone: the protocol F(x_t, t, tt, cond) on (B, C, H, W) latents."""
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

from twinflow.backbones.qwen_image import QwenCondition
from twinflow.backbones.qwen_image.backbone import pack_latents, trim_text, unpack_latents
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config

from qwen_helpers import C, build_tiny, make_cond, randomize_


def times(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g)
    return t, t * torch.rand(batch, generator=g)


def test_pack_matches_pipeline_and_unpack_inverts_it():
    x = torch.randn(2, C, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x, 2, C, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    vae_scale = 8
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 6 * vae_scale, 10 * vae_scale, vae_scale)[:, :, 0], x)


@torch.no_grad()
def test_backbone_is_the_transformer_on_packed_latents_with_signed_times():
    backbone = build_tiny()
    randomize_(backbone, 1)
    x = torch.randn(3, C, 4, 6)
    t, tt = times(3)
    t, tt = -t, -tt  # the twin trajectory: signed times reach the network unchanged
    cond = make_cond([5, 5, 5])
    out = backbone(x, t, tt, cond)
    direct = backbone.transformer(
        hidden_states=pack_latents(x), encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=None,
        timestep=t, target_timestep=tt, img_shapes=[[(1, 2, 3)]] * 3, return_dict=False,
    )[0]
    assert out.shape == x.shape
    assert torch.equal(out, unpack_latents(direct, 4, 6))


@torch.no_grad()
def test_padded_text_gives_the_unpadded_result():
    backbone = build_tiny()
    randomize_(backbone, 2)
    x = torch.randn(3, C, 4, 4)
    t, tt = times(3, seed=1)
    lengths = [2, 7, 4]
    cond = make_cond(lengths, seed=3)
    out = backbone(x, t, tt, cond)
    assert out.isfinite().all()
    for i, n in enumerate(lengths):
        alone = QwenCondition(cond.embeds[i : i + 1, :n], cond.mask[i : i + 1, :n])
        single = backbone(x[i : i + 1], t[i : i + 1], tt[i : i + 1], alone)
        torch.testing.assert_close(out[i : i + 1], single, rtol=1e-5, atol=1e-5)
    # Extra columns that are padding in every row (as cat() with a longer prompt leaves) change nothing.
    wider = QwenCondition(torch.cat([cond.embeds, torch.randn(3, 3, cond.embeds.shape[2])], 1),
                          torch.cat([cond.mask, torch.zeros(3, 3, dtype=torch.bool)], 1))
    torch.testing.assert_close(backbone(x, t, tt, wider), out, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_empty_prompt_rows_stay_finite():
    backbone = build_tiny()
    cond = make_cond([3, 3], seed=4)
    cond.mask[0] = False
    out = backbone(torch.randn(2, C, 4, 4), *times(2), cond)
    assert out.isfinite().all()


def test_trim_text():
    embeds = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    e, m = trim_text(embeds, mask)
    assert torch.equal(e, embeds[:, :3]) and torch.equal(m, mask[:, :3])
    e, m = trim_text(embeds, torch.tensor([[1, 1, 0, 0, 0]] * 2, dtype=torch.bool))
    assert torch.equal(e, embeds[:, :2]) and m is None
    e, m = trim_text(embeds, torch.zeros(2, 5, dtype=torch.bool))
    assert e.shape[1] == 1 and not m.any()


@torch.no_grad()
def test_edit_variant_appends_reference_and_slices_prediction():
    backbone = build_tiny(edit=True, transformer={**tiny_transformer_config(), "zero_cond_t": True})
    randomize_(backbone, 5)
    x = torch.randn(2, C, 4, 6)
    t, tt = times(2)
    cond = make_cond([3, 5], ref_hw=(6, 4))
    out = backbone(x, t, tt, cond)
    assert out.shape == x.shape and out.isfinite().all()
    full = backbone.transformer(
        hidden_states=torch.cat([pack_latents(x), pack_latents(cond.ref_latents)], 1),
        encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=cond.mask, timestep=t, target_timestep=tt,
        img_shapes=[[(1, 2, 3), (1, 3, 2)]] * 2, return_dict=False,
    )[0]
    assert full.shape[1] == 6 + 6
    torch.testing.assert_close(out, unpack_latents(full[:, :6], 4, 6), rtol=1e-5, atol=1e-5)
    other = QwenCondition(cond.embeds, cond.mask, cond.ref_latents + 1.0)
    assert (backbone(x, t, tt, other) - out).abs().max() > 1e-3


@pytest.mark.parametrize(
    "x_shape, t_shape, lengths, ref_hw, match",
    [
        ((2, C, 5, 4), (2,), [2, 2], None, "H=5, W=4 must be divisible by the patch size 2"),
        ((2, C + 1, 4, 4), (2,), [2, 2], None, f"{C + 1} channels; the transformer expects {C}"),
        ((2, C, 4), (2,), [2, 2], None, r"x_t must be \(B, C, H, W\)"),
        ((2, C, 4, 4), (3,), [2, 2], None, r"t must have shape \(B,\)"),
        ((2, C, 4, 4), (2,), [2, 2, 2], None, "cond batch 3"),
        ((2, C, 4, 4), (2,), [2, 2], (4, 4), "not the edit variant"),
    ],
)
def test_shape_errors_name_the_problem(x_shape, t_shape, lengths, ref_hw, match):
    backbone = build_tiny()
    with pytest.raises(ValueError, match=match):
        backbone(torch.zeros(x_shape), torch.zeros(t_shape), torch.zeros(t_shape), make_cond(lengths, ref_hw=ref_hw))


def test_edit_errors():
    backbone = build_tiny(edit=True)
    with pytest.raises(ValueError, match="ref_latents .* is required"):
        backbone(torch.zeros(1, C, 4, 4), torch.zeros(1), torch.zeros(1), make_cond([2]))
    with pytest.raises(ValueError, match="cond.ref_latents spatial size H=3"):
        backbone(torch.zeros(1, C, 4, 4), torch.zeros(1), torch.zeros(1), make_cond([2], ref_hw=(3, 4)))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        backbone(torch.zeros(1, C, 4, 4), torch.zeros(1), torch.zeros(1),
                 QwenCondition(torch.zeros(1, 2, 7), torch.ones(1, 2), torch.zeros(1, C, 4, 4)))


def test_gradient_checkpointing_gives_same_gradients():
    results = []
    for checkpointing in (False, True):
        backbone = build_tiny(gradient_checkpointing=checkpointing).train()
        randomize_(backbone, 6)
        assert backbone.transformer.gradient_checkpointing is checkpointing
        x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))
        backbone(x, *times(2), make_cond([2, 4])).square().mean().backward()
        # The last block's text-stream outputs are discarded, so some weights get no gradient at all.
        results.append({n: p.grad for n, p in backbone.named_parameters() if p.grad is not None})
    assert results[0].keys() == results[1].keys() and len(results[0]) > 50
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_bfloat16_backbone_returns_input_dtype():
    backbone = build_tiny(dtype="bfloat16")
    assert next(backbone.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, C, 4, 4)
    out = backbone(x, *times(2), make_cond([2, 3]))
    assert out.dtype == torch.float32 and out.isfinite().all()
