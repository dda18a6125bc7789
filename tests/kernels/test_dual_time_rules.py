"""The dual-time embedding under each backbone's combine rule (kernels/dual_time_rule.py): the eager
reference against the backbone's eager formula written over diffusers' own modules (bit for bit), the
Triton kernels against the reference (forward and gradients for the weights of both embedders, the extra
inputs and the returned parts), identity at ``t == tt``, and the host checks that refuse a rule that
does not fit the embedders or the inputs. Qwen-Image's rule has its own, older file
(test_dual_time_embedding.py); it runs here too, through the same parameterised tests."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from diffusers.models.transformers.transformer_z_image import TimestepEmbedder

from twinflow.kernels.dual_time_embedding import (
    QWEN_IMAGE,
    RULES,
    SANA,
    SD35,
    Z_IMAGE,
    CombineRule,
    DualTimestepEmbedding,
    dual_time_embedding,
    dual_time_embedding_reference,
    embedder_weights,
    timestep_sinusoid,
    timestep_sinusoid_pair_triton,
)
from twinflow.kernels.dual_time_rule import combine, combine_coefficient, embedder_times

DTYPES = [torch.float32, torch.bfloat16]
WIDTH, POOLED = 48, 24
Z_HIDDEN = 96  # Z-Image's embedder is 256 -> 1024 -> 256: Linear2 is not square


def tolerance(dtype: torch.dtype, reduction: int) -> float:
    """Allowed ``max|kernel - reference| / max|reference|``, from what differs between the two paths.

    Both do the same operations and round at the same places, except: the order of the products in each
    float32 dot (tiles vs. BLAS), sin/cos (numpy under the interpreter, within 2 ulp of torch's), where
    the combine rounds (the kernel rounds once; Qwen-Image's eager combine rounds the product first), and
    Z-Image's float64 combine (float32 in the kernel: one more rounding). With ``u`` the unit roundoff:

    * float32: reordering a dot of K terms moves it by rounding noise that grows like sqrt(K) u of its
      terms' scale; ``reduction`` is the summed length of the dots an output passes through (the
      sinusoid channels, the hidden width, and for gradients the output width and the batch), and a
      factor 4 covers the scale of the terms against the output and the O(1) elementwise roundings.
    * bfloat16: intermediates are rounded to bfloat16 at the same module boundaries in both paths; a
      float32 reordering can flip one such rounding by one bfloat16 ulp (u relative), and the combine's
      rounding placement adds at most one more ulp of the output: 2.5 u.

    Both stay within ALGORITHM.md §5 (1e-5 and 1e-2) at the sizes tested here (asserted)."""
    u = torch.finfo(dtype).eps / 2
    tol = 4 * math.sqrt(reduction) * u if dtype == torch.float32 else 2.5 * u
    assert tol <= {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    return tol


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# Each backbone: its embedders, its times, and its eager combine written over diffusers' modules
# (as twinflow/backbones/<name>/transformer.py computes it)
# ------------------------------------------------------------------------------------------------

def make_embedders(rule: CombineRule, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    build = {
        "qwen_image": lambda: QwenTimestepProjEmbeddings(WIDTH),
        "sd35": lambda: CombinedTimestepTextProjEmbeddings(WIDTH, POOLED),
        "sana": lambda: AdaLayerNormSingle(WIDTH),
        "z_image": lambda: TimestepEmbedder(WIDTH, mid_size=Z_HIDDEN),
    }[rule.name]
    return build().to(dtype), build().to(dtype)


def make_times(rule: CombineRule, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed times with tt between 0 and t, every third row tt == t; in SD3's and SANA's units (1000 t)
    for theirs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g) * 2 - 1
    tt = t - torch.rand(batch, generator=g) * t
    tt[::3] = t[::3]
    scale = 1000.0 if rule.coefficient_divisor == 1000.0 else 1.0
    return t * scale, tt * scale


def make_extra(rule: CombineRule, e1, e2, batch: int, dtype: torch.dtype, device="cpu"):
    """SD3.5's extra inputs: each embedder's projection of one pooled text vector (computed eagerly),
    and that vector; None for the other rules."""
    if not rule.extra_inputs:
        return None
    pooled = torch.randn(batch, POOLED, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    return e1.text_embedder(pooled), e2.text_embedder(pooled), pooled


def backbone_eager(rule: CombineRule, e1, e2, t, tt, dtype, pooled=None):
    """The backbone's own eager dual-time embedding, from the diffusers modules' forwards."""
    if rule is QWEN_IMAGE:
        hidden = torch.empty(0, dtype=dtype)
        return e1(t, hidden) + e2(tt, hidden) * (t.float() - tt.float()).to(dtype)[:, None]
    if rule is SD35:
        a, b = e1(t, pooled), e2(tt, pooled)
        return (a.float() + b.float() * ((t.float() - tt.float()) / 1000.0).unsqueeze(-1)).to(a.dtype)
    if rule is SANA:
        (mod_1, emb_1), (mod_2, emb_2) = (e(x, batch_size=t.shape[0], hidden_dtype=dtype)
                                          for e, x in ((e1, t), (e2, tt)))
        coefficient = ((t - tt) / 1000.0).unsqueeze(1)
        return (emb_1 + emb_2 * coefficient).to(emb_1.dtype), (mod_1 + mod_2 * coefficient).to(mod_1.dtype)
    s, t64, tt64 = 1000.0, t.to(torch.float64), tt.to(torch.float64)
    a, b = TimestepEmbedder.forward(e1, t64.abs() * s), e2(tt64 * s - t64 * s)
    return (a + b * (t64 - tt64).abs().unsqueeze(1)).to(dtype)


def weights_of(rule, e1, e2):
    return list(embedder_weights(e1, "embed_1", rule) + embedder_weights(e2, "embed_2", rule))


RULE_LIST = list(RULES.values())
RULE_IDS = list(RULES)


# ------------------------------------------------------------------------------------------------
# Eager reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_reference_is_the_backbones_eager_rule_bit_for_bit(rule, dtype):
    e1, e2 = make_embedders(rule, dtype)
    t, tt = make_times(rule, 9)
    extra = make_extra(rule, e1, e2, 9, dtype)
    ref, parts = dual_time_embedding_reference(t, tt, *weights_of(rule, e1, e2), dtype, rule=rule,
                                               extra=extra and extra[:2], with_parts=True)
    eager = backbone_eager(rule, e1, e2, t, tt, dtype, pooled=extra and extra[2])
    if rule is SANA:  # the embedded timestep; the modulation is linear(silu(.)) of each part, combined alike
        eager, eager_mod = eager
        mods = [e.linear(e.silu(p)) for e, p in zip((e1, e2), parts)]
        assert torch.equal(combine(*mods, combine_coefficient(t, tt, rule, dtype), dtype), eager_mod)
    assert ref.dtype == dtype and ref.shape == (9, WIDTH)
    assert torch.equal(ref, eager)


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_reference_at_equal_times_is_the_first_embedder(rule):
    """ALGORITHM.md §2.1: every rule is exactly E1 (plus its extra input) at t == tt, whatever E2 holds."""
    dtype = torch.bfloat16
    e1, e2 = make_embedders(rule, dtype)
    t, _ = make_times(rule, 7)
    extra = make_extra(rule, e1, e2, 7, dtype)
    ref, parts = dual_time_embedding_reference(t, t, *weights_of(rule, e1, e2), dtype, rule=rule,
                                               extra=extra and extra[:2], with_parts=True)
    assert torch.equal(ref, parts[0])
    tau_1, _ = embedder_times(t, t, rule)
    first = {"qwen_image": lambda: e1(t, torch.empty(0, dtype=dtype)), "sd35": lambda: e1(t, extra[2]),
             "sana": lambda: e1(t, batch_size=7, hidden_dtype=dtype)[1],
             "z_image": lambda: TimestepEmbedder.forward(e1, tau_1)}[rule.name]()
    assert torch.equal(ref, first)


def test_rules_time_arithmetic():
    t, tt = torch.tensor([0.5, -0.25, 0.0]), torch.tensor([0.25, -0.5, 0.0])
    tau_1, tau_2 = embedder_times(t, tt, Z_IMAGE)
    assert tau_1.dtype == torch.float64 and tau_1.tolist() == [500.0, 250.0, 0.0]
    assert tau_2.tolist() == [-250.0, -250.0, 0.0]  # tt s - t s
    assert combine_coefficient(t, tt, Z_IMAGE, torch.bfloat16).tolist() == [0.25, 0.25, 0.0]
    assert combine_coefficient(t * 1000, tt * 1000, SD35, torch.bfloat16).tolist() == [0.25, 0.25, 0.0]
    assert combine_coefficient(t, tt, QWEN_IMAGE, torch.bfloat16).dtype == torch.bfloat16
    flipped = dataclasses.replace(Z_IMAGE, name="flipped", second_input="t - tt")
    assert embedder_times(t, tt, flipped)[1].tolist() == [250.0, 250.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Kernels against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_sinusoid_kernel_embeds_the_rules_times(device, rule):
    t, tt = make_times(rule, 301, seed=3)
    t, tt = t.to(device), tt.to(device)
    proj = timestep_sinusoid_pair_triton(t, tt, 256, torch.float32, rule=rule)
    expected = torch.stack([timestep_sinusoid(tau, 256, rule.sinusoid_scale) for tau in embedder_times(t, tt, rule)])
    if device.type == "cuda":
        assert torch.equal(proj, expected)
    else:  # same float32 arguments; numpy's and torch's sin/cos each within 1 ulp (see the Qwen-Image test)
        diff = (proj.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
        assert diff.max().item() <= 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5, 17])
@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_forward_matches_reference(device, rule, batch, dtype, poisoned_allocations):
    e1, e2 = (e.to(device) for e in make_embedders(rule, dtype, seed=batch))
    t, tt = (x.to(device) for x in make_times(rule, batch, seed=batch))
    extra = make_extra(rule, e1, e2, batch, dtype, device)
    extra = extra and extra[:2]
    weights = weights_of(rule, e1, e2)
    ref, ref_parts = dual_time_embedding_reference(t, tt, *weights, dtype, rule=rule, extra=extra, with_parts=True)
    with poisoned_allocations() as record:
        out, parts = dual_time_embedding(t, tt, e1, e2, dtype, "triton", rule=rule, extra=extra, with_parts=True)
        plain = dual_time_embedding(t, tt, e1, e2, dtype, "triton", rule=rule, extra=extra)
    assert record.count > 0
    tol = tolerance(dtype, 256 + weights[0].shape[0])
    assert out.dtype == dtype and out.shape == (batch, WIDTH) and parts.shape == (2, batch, WIDTH)
    assert rel_err(out, ref) <= tol
    assert rel_err(parts, ref_parts) <= tol
    assert torch.equal(plain, out)
    # Rows with t == tt do not depend on E2 at all (bitwise), and equal E1's part.
    equal = t == tt
    _, other = make_embedders(rule, dtype, seed=99)
    out_other = dual_time_embedding(t, tt, e1, other.to(device), dtype, "triton", rule=rule,
                                    extra=extra and (extra[0], 2 * extra[1]))
    assert torch.equal(out[equal], out_other[equal]) and torch.equal(out[equal], parts[0][equal])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 6, 33])
@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_gradients_match_reference(device, rule, batch, dtype, poisoned_allocations):
    """Gradients for both embedders' weights, the extra inputs (SD3.5) and through the returned parts
    (SANA's modulation path), against eager autograd of the reference."""
    e1, e2 = (e.to(device) for e in make_embedders(rule, dtype, seed=batch))
    t, tt = (x.to(device) for x in make_times(rule, batch, seed=batch + 1))
    weights = weights_of(rule, e1, e2)
    extra = make_extra(rule, e1, e2, batch, dtype, device)
    leaves = list(weights)
    if extra is not None:
        extra = tuple(x.detach().requires_grad_(True) for x in extra[:2])
        leaves += list(extra)
    with_parts = rule is SANA
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(batch, WIDTH, generator=g).to(device=device, dtype=dtype)
    grad_parts = torch.randn(2, batch, WIDTH, generator=g).to(device=device, dtype=dtype)

    def grads(backend):
        result = dual_time_embedding(t, tt, e1, e2, dtype, backend, rule=rule, extra=extra, with_parts=with_parts)
        outs, seeds = ((result[0], result[1]), (grad_out, grad_parts)) if with_parts else ((result,), (grad_out,))
        return torch.autograd.grad(outs, leaves, seeds)

    with poisoned_allocations() as record:
        got = grads("triton")
    assert record.count > 0
    tol = tolerance(dtype, 256 + weights[0].shape[0] + WIDTH + batch)
    names = ["w1_1", "b1_1", "w2_1", "b2_1", "w1_2", "b1_2", "w2_2", "b2_2", "x_1", "x_2"]
    for name, a, b in zip(names, got, grads("eager")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if b.abs().max() == 0:  # E2's gradients vanish when every row has t == tt (batch 1), parts aside
            assert torch.equal(a, b), name
        else:
            assert rel_err(a, b) <= tol, name


def test_float64_times_stay_float64(device):
    """Z-Image's times may arrive in float64 (mixed with float32): the kernel does the rule's float64
    arithmetic on them, as the reference."""
    e1, e2 = (e.to(device) for e in make_embedders(Z_IMAGE, torch.float32))
    t, tt = make_times(Z_IMAGE, 8, seed=4)
    t = (t.double() + 1e-12).to(device)  # not a float32 value
    tt = tt.to(device)
    ref = dual_time_embedding_reference(t, tt, *weights_of(Z_IMAGE, e1, e2), torch.float32, rule=Z_IMAGE)
    out = dual_time_embedding(t, tt, e1, e2, torch.float32, "triton", rule=Z_IMAGE)
    assert rel_err(out, ref) <= tolerance(torch.float32, 256 + Z_HIDDEN)


def test_module_takes_the_rule():
    e1, e2 = make_embedders(SD35, torch.float32)
    module = DualTimestepEmbedding(e1, e2, backend="triton", rule=SD35)
    assert list(module.parameters()) == [] and "rule='sd35'" in repr(module)
    t, tt = make_times(SD35, 4)
    x_1, x_2, pooled = make_extra(SD35, e1, e2, 4, torch.float32)
    out = module(t, tt, torch.float32, extra=(x_1, x_2))
    assert rel_err(out, backbone_eager(SD35, e1, e2, t, tt, torch.float32, pooled)) <= tolerance(torch.float32, 304)


# ------------------------------------------------------------------------------------------------
# Host checks: a rule that does not fit the embedders or the inputs is refused, naming the problem
# ------------------------------------------------------------------------------------------------

def test_rule_and_shape_mismatches_are_refused():
    qwen = make_embedders(QWEN_IMAGE, torch.float32)
    sd3 = make_embedders(SD35, torch.float32)
    t, tt = make_times(SD35, 4)
    x_1, x_2, _ = make_extra(SD35, *sd3, 4, torch.float32)
    for backend in ("eager", "triton"):
        with pytest.raises(ValueError, match=r"rule sd35 adds an extra input .* pass extra=\(x_1, x_2\), each \(4, 48"):
            dual_time_embedding(t, tt, *sd3, torch.float32, backend, rule=SD35)
        with pytest.raises(ValueError, match="rule sana has no extra inputs"):
            dual_time_embedding(t, tt, *make_embedders(SANA, torch.float32), torch.float32, backend, rule=SANA,
                                extra=(x_1, x_2))
        with pytest.raises(ValueError, match=r"extra input x_2 has shape \(4, 47\), expected \(4, 48\)"):
            dual_time_embedding(t, tt, *sd3, torch.float32, backend, rule=SD35, extra=(x_1, x_2[:, 1:]))
        with pytest.raises(ValueError, match=r"extra input x_1 is torch.bfloat16"):
            dual_time_embedding(t, tt, *sd3, torch.float32, backend, rule=SD35, extra=(x_1.bfloat16(), x_2))
        # A rule that is not the embedders' (their sinusoid scales differ).
        with pytest.raises(ValueError, match="embed_1's sinusoid has scale 1 but rule qwen_image expects 1000"):
            dual_time_embedding(t, tt, *sd3, torch.float32, backend, extra=(x_1, x_2))
        with pytest.raises(ValueError, match="embed_1's sinusoid has scale 1000 but rule sd35 expects 1"):
            dual_time_embedding(t, tt, *qwen, torch.float32, backend, rule=SD35, extra=(x_1, x_2))
        with pytest.raises(TypeError, match="rule must be a CombineRule"):
            dual_time_embedding_reference(t, tt, *weights_of(QWEN_IMAGE, *qwen), torch.float32, rule="qwen_image")
    with pytest.raises(ValueError, match="embed_2's sinusoid has scale 1000 but rule z_image expects 1"):
        DualTimestepEmbedding(make_embedders(Z_IMAGE, torch.float32)[0], qwen[1], rule=Z_IMAGE)
    z1, _ = make_embedders(Z_IMAGE, torch.float32)
    with pytest.raises(ValueError, match=r"w1_2 has shape \(48, 256\), expected \(96, 256\)"):
        dual_time_embedding(t, tt, z1, make_embedders(SANA, torch.float32)[0], torch.float32, "eager", rule=Z_IMAGE)
    with pytest.raises(ValueError, match="uses additional conditions"):
        DualTimestepEmbedding(AdaLayerNormSingle(WIDTH, use_additional_conditions=True), AdaLayerNormSingle(WIDTH),
                              rule=SANA)
    with pytest.raises(TypeError, match="rule must be a CombineRule"):
        DualTimestepEmbedding(*qwen, rule=SD35.name)


def test_rules_are_checked_when_made():
    with pytest.raises(ValueError, match="second_input must be one of"):
        CombineRule("bad", second_input="t + tt")
    with pytest.raises(ValueError, match="time_scale must be a non-zero float32 value"):
        CombineRule("bad", time_scale=0.1)
    with pytest.raises(ValueError, match="coefficient_divisor must be a non-zero float32 value"):
        CombineRule("bad", coefficient_divisor=0)
    assert CombineRule("ok", time_scale=1000).time_scale == 1000.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD35.extra_inputs = False
