"""Attention backend selection (config key ``attention_backend``) and packed attention for padded text."""
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName

from twinflow.backbones.qwen_image import attention
from twinflow.backbones.qwen_image.attention import (
    PackedJointAttnProcessor,
    attention_path_calls,
    configure_attention,
    packed_attention,
    packed_path,
    plan_packing,
    resolve_attention_backend,
)
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.utils.typed_config import ConfigError

from qwen_helpers import C, TEXT_DIM, build_tiny, make_cond, plain_copy, randomize_, twin_model


def test_auto_on_this_cpu_machine_picks_native_flash_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_attention_backend("auto", "cpu", torch.float32) == "_native_flash"
    assert "attention_backend=auto -> '_native_flash'" in caplog.text


@pytest.mark.parametrize(
    "hopper, fa3, fa2, dtype, expected",
    [
        (True, True, True, torch.bfloat16, "_flash_3"),
        (False, True, True, torch.bfloat16, "flash"),
        (True, False, True, torch.bfloat16, "flash"),
        (True, False, False, torch.bfloat16, "_native_flash"),
        (True, True, True, torch.float32, "native"),
    ],
)
def test_auto_preference_order_on_cuda(monkeypatch, hopper, fa3, fa2, dtype, expected):
    monkeypatch.setattr(attention, "is_hopper", lambda device: hopper)
    monkeypatch.setattr(attention, "flash_attn_3_available", lambda: fa3)
    monkeypatch.setattr(attention, "flash_attn_2_available", lambda: fa2)
    assert resolve_attention_backend("auto", "cuda", dtype) == expected


@pytest.mark.parametrize(
    "requested, device, dtype, match",
    [
        ("flash", "cpu", torch.bfloat16, "'attention_backend': 'flash' needs the flash-attn"),
        ("_flash_3", "cpu", torch.bfloat16, "'_flash_3' needs FlashAttention-3's 'flash_attn_interface'"),
        ("flash_varlen", "cpu", torch.bfloat16, "'attention_backend': 'flash_varlen' is not supported"),
        ("_native_flash", "cuda", torch.float32, "needs fp16/bf16 on CUDA"),
    ],
)
def test_unavailable_backend_is_a_config_error(requested, device, dtype, match):
    if requested in ("flash", "_flash_3") and (attention.flash_attn_2_available() or attention.flash_attn_3_available()):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=match):
        resolve_attention_backend(requested, device, dtype)


def test_explicit_backend_reaches_every_processor_without_global_side_effect():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    backbone = build_tiny(attention_backend="_native_math")
    processors = [m.processor for m in backbone.modules() if hasattr(m, "processor")]
    assert len(processors) == 2 and all(isinstance(p, PackedJointAttnProcessor) for p in processors)
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in processors)
    assert _AttentionBackendRegistry._active_backend == before


# --- Packed attention -----------------------------------------------------------------------------------

EPS64 = torch.finfo(torch.float64).eps
RAGGED = [7, 1, 4, 0, 4, 2]
"""Valid text tokens per row (text length 7): a row without padding, one with a single valid token, one
with none (it still attends to its image tokens), and two rows of equal length (one group of two)."""
IMAGE_TOKENS = 5


def ragged_mask(lengths, text_len=None):
    text_len = max(lengths) if text_len is None else text_len
    return torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]


def masked_sdpa(q, k, v, key_mask):
    """The old path: SDPA over the whole padded sequence with a boolean key mask ((B, S, H, D) layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2)


def qkv64(batch, seq, heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(3)]


def summation_tolerance(terms: int, magnitude: float) -> float:
    """Bound on the float64 difference between two evaluations of the same attention that sum the same
    terms in a different order (flash's blocked online softmax against the math kernel's two passes).
    A sum of n terms carries at most (n - 1) u sum|terms| of rounding error (u = eps / 2), and so does
    each of the two evaluations; attention's backward chains three such contractions (dO V^T, the softmax
    Jacobian, dS K or P^T dO). With unit-normal inputs at head_dim 8 the logits are O(3) and sum|terms| is
    within a few times the largest value, so 8 n eps max|value| bounds every difference; a padded key that
    leaked into a row would move its output by O(0.1), 10^12 times more."""
    return 8 * terms * EPS64 * max(1.0, magnitude)


def test_plan_packs_rows_by_length_and_keeps_each_rows_tokens_in_order():
    mask = ragged_mask([2, 0, 2, 1])
    plan = plan_packing(mask, image_len=2)  # seq_len 4: text 0-1, image 2-3
    # stable sort by count: rows 1 (0 text), 3 (1), 0 (2), 2 (2)
    assert plan.index.tolist() == [6, 7, 12, 14, 15, 0, 1, 2, 3, 8, 9, 10, 11]
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.tolist() == [0, 2, 5, 9, 13]
    assert plan.max_seqlen == 4
    assert plan.groups == ((0, 1, 2), (2, 1, 3), (5, 2, 4))
    assert not plan.dense and plan_packing(ragged_mask([2, 2]), image_len=2).dense


def test_plan_takes_any_mask_pattern():
    mask = torch.tensor([[False, True, False, True], [True, True, True, True]])
    plan = plan_packing(mask, image_len=1)
    assert plan.index.tolist() == [1, 3, 4, 5, 6, 7, 8, 9]
    assert plan.groups == ((0, 1, 3), (3, 1, 5))


@pytest.mark.parametrize("backend", ["native", "_native_flash", "_native_math"])
@pytest.mark.parametrize("pattern", ["right_padded", "scattered"])
def test_packed_attention_equals_masked_sdpa_forward_and_backward_float64(backend, pattern):
    text_len = max(RAGGED)
    if pattern == "right_padded":
        text_mask = ragged_mask(RAGGED)
    else:  # valid text tokens anywhere in the row (same counts): the packing must not assume a prefix
        g = torch.Generator().manual_seed(5)
        text_mask = torch.stack([torch.randperm(text_len, generator=g) < n for n in RAGGED])
    batch, seq = len(RAGGED), text_len + IMAGE_TOKENS
    key_mask = torch.cat([text_mask, torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool)], dim=1)
    q, k, v = qkv64(batch, seq)
    out = packed_attention(q, k, v, plan_packing(text_mask, IMAGE_TOKENS), AttentionBackendName(backend))
    ref = masked_sdpa(q, k, v, key_mask)
    valid = key_mask[:, :, None, None]
    tol = summation_tolerance(seq, ref.abs().max().item())
    torch.testing.assert_close(out * valid, ref * valid, rtol=0, atol=tol)
    assert torch.equal(out[~key_mask], torch.zeros_like(out[~key_mask])), "padded queries get zeros"
    # Backward through the valid outputs only (padded text queries feed nothing in the model).
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * valid
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=summation_tolerance(seq, want.abs().max().item()),
                                   msg=lambda m: f"d/d{name}: {m}")


def test_the_tolerance_catches_a_leaked_padded_key():
    """The comparison above can fail: attending to one padded key (what dropping the mask would do) is
    far outside the tolerance."""
    batch, seq = len(RAGGED), max(RAGGED) + IMAGE_TOKENS
    key_mask = torch.cat([ragged_mask(RAGGED), torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool)], dim=1)
    q, k, v = qkv64(batch, seq)
    leaky = key_mask.clone()
    leaky[1, 1] = True  # row 1 has one valid text token: its first padded key leaks
    ref = masked_sdpa(q, k, v, key_mask)
    diff = (masked_sdpa(q, k, v, leaky) - ref)[key_mask].abs().max().item()
    assert diff > 1e6 * summation_tolerance(seq, ref.abs().max().item())


def test_packed_path_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed_path("_native_flash", cpu, torch.float32) == "grouped_sdpa"
    assert packed_path("_native_flash", cpu, torch.bfloat16) == "grouped_sdpa"
    assert packed_path("native", cuda, torch.float32) == "grouped_sdpa"
    assert packed_path("native", cuda, torch.bfloat16) == "grouped_sdpa"  # an explicit non-flash backend is kept


@pytest.mark.parametrize("fa2, torch_varlen, expected", [
    (True, True, "varlen_flash_attn"), (False, True, "varlen_torch"), (False, False, "grouped_sdpa"),
])
def test_packed_path_on_cuda_with_a_flash_backend(monkeypatch, fa2, torch_varlen, expected):
    monkeypatch.setattr(attention, "flash_attn_2_available", lambda: fa2)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: torch_varlen)
    for backend in ("_native_flash", "flash", "_flash_3"):
        assert packed_path(backend, torch.device("cuda"), torch.bfloat16) == expected


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """A stand-in for the varlen kernels written from their contract: packed (total, H, D) tensors, rows
    delimited by int32 ``cu_seqlens``, non-causal."""
    assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
    bounds = cu_q.tolist()
    assert bounds[-1] == q.shape[0] and max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    rows = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(rows)


@pytest.mark.parametrize("path", ["varlen_flash_attn", "varlen_torch"])
def test_varlen_branches_pass_the_packed_layout_the_kernels_expect(monkeypatch, path):
    """CPU check of the two CUDA-only branches' arguments: the kernels are replaced by a reference
    implementation of their contract (the GPU check runs the real kernels)."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=reference_varlen))
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", reference_varlen, raising=False)
    batch, seq = len(RAGGED), max(RAGGED) + IMAGE_TOKENS
    text_mask = ragged_mask(RAGGED)
    key_mask = torch.cat([text_mask, torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool)], dim=1)
    q, k, v = qkv64(batch, seq)
    before = attention_path_calls()[path]
    out = packed_attention(q, k, v, plan_packing(text_mask, IMAGE_TOKENS), AttentionBackendName("_native_flash"),
                           path=path)
    assert attention_path_calls()[path] == before + 1
    ref = masked_sdpa(q, k, v, key_mask)
    valid = key_mask[:, :, None, None]
    torch.testing.assert_close(out * valid, ref * valid, rtol=0, atol=summation_tolerance(seq, ref.abs().max().item()))


def path_calls_during(fn):
    before = attention_path_calls()
    result = fn()
    return result, {k: n - before[k] for k, n in attention_path_calls().items() if n != before[k]}


def test_padded_batch_never_reaches_a_masked_kernel(monkeypatch):
    """A padded text batch runs SDPA without a mask on every call (the old code sent it to masked SDPA)."""
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for backend in ("_native_flash", "native"):
        masks.clear()
        backbone = build_tiny(attention_backend=backend)
        x, t = torch.randn(3, C, 4, 4), torch.rand(3)
        with torch.no_grad():
            _, paths = path_calls_during(lambda: backbone(x, t, t, make_cond([2, 5, 1])))
        assert masks and all(m is None for m in masks), backend
        assert paths == {"grouped_sdpa": 2}, backend  # two blocks, on CPU
        with torch.no_grad():
            _, paths = path_calls_during(lambda: backbone(x, t, t, make_cond([5, 5, 5])))
        assert paths == {"dense": 2}, backend  # unpadded: the plain path


def transformer_inputs(lengths, batch_seed=1):
    g = torch.Generator().manual_seed(batch_seed)
    batch, text_len = len(lengths), max(lengths)
    in_channels = tiny_transformer_config()["in_channels"]
    return dict(
        hidden_states=torch.randn(batch, 16, in_channels, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g, dtype=torch.float64),
        encoder_hidden_states_mask=ragged_mask(lengths),
        timestep=torch.rand(batch, generator=g, dtype=torch.float64),
        img_shapes=[[(1, 4, 4)]] * batch,
        return_dict=False,
    )


@pytest.mark.parametrize("backend", ["_native_flash", "native"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformer_with_packed_attention_equals_diffusers_masked_sdpa_float64(backend, checkpointing):
    """The whole tiny Qwen-Image transformer: output and every weight gradient with packed attention
    equal diffusers' own model and processor (masked SDPA) on a ragged batch, in float64.

    Tolerance: each value differs only by summation order inside attention, propagated through two
    blocks. The longest reductions are the weight gradients' sums over batch x tokens (6 x 23 = 138
    terms), stacked over about four contractions per block (projection, attention, its backward), so a
    float64 bound is 4 x 138 x eps x (sum|terms| <= ~100 max|value| for these random weights)
    ~ 1e-11 max|value|. A leaked padded key changes outputs at the 1e-2 relative level."""
    ours = twin_model(0).double()
    configure_attention(ours, backend)
    diffusers_model = plain_copy(ours).double()
    if checkpointing:
        ours.enable_gradient_checkpointing()
        diffusers_model.enable_gradient_checkpointing()
    ours.train(), diffusers_model.train()
    inputs = transformer_inputs(RAGGED)
    out, paths = path_calls_during(lambda: ours(**inputs)[0])
    assert paths == {"grouped_sdpa": 2}
    ref = diffusers_model(**inputs)[0]
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11 * scale)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    theirs = dict(diffusers_model.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if name in theirs and theirs[name].grad is not None:
            want = theirs[name].grad
            torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-11 * max(1.0, want.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")
            compared += 1
    assert compared > 20


@pytest.mark.parametrize("with_mask", [False, True])
def test_unpadded_transformer_call_takes_the_dense_path_and_equals_diffusers(with_mask):
    ours = twin_model(0).double()
    configure_attention(ours, "_native_flash")
    inputs = transformer_inputs([4, 4, 4])
    if not with_mask:
        inputs["encoder_hidden_states_mask"] = None
    with torch.no_grad():
        out, paths = path_calls_during(lambda: ours(**inputs)[0])
        ref = plain_copy(ours).double()(**inputs)[0]
    assert paths == {"dense": 2}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11 * ref.abs().max().item())


# --- CUDA: the varlen kernels and SDPA's kernels without a mask (run by the GPU check) --------------------

BF16_U = 2.0**-8  # bfloat16 unit roundoff


@pytest.mark.parametrize("backend, dtype, path", [
    ("_native_flash", torch.bfloat16, "varlen"),  # varlen_flash_attn if flash-attn imports, else varlen_torch
    ("native", torch.float32, "grouped_sdpa"),
])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_attention_on_cuda_matches_a_float64_reference(backend, dtype, path):
    heads, head_dim, image = 4, 128, 64
    text_mask = ragged_mask([48, 1, 17, 0, 17, 33], text_len=48).cuda()
    batch, seq = text_mask.shape[0], 48 + image
    key_mask = torch.cat([text_mask, torch.ones(batch, image, dtype=torch.bool, device="cuda")], dim=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=g, device="cuda").to(dtype).requires_grad_()
               for _ in range(3))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    before = attention_path_calls()
    out = packed_attention(q, k, v, plan_packing(text_mask, image), AttentionBackendName(backend))
    ran = {p for p, n in attention_path_calls().items() if n != before[p]}
    if path == "varlen":
        path = "varlen_flash_attn" if attention.flash_attn_2_available() else "varlen_torch"
    assert ran == {path}
    ref = masked_sdpa(q64, k64, v64, key_mask)
    valid = key_mask[:, :, None, None]
    weight = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.float64) * valid
    grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q64, k64, v64))
    masked = masked_sdpa(q, k, v, key_mask)  # the old path, same dtype and inputs
    masked_grads = torch.autograd.grad((masked.double() * weight).sum(), (q, k, v))
    # Output, bf16: o = sum_j p_j v_j with each p_j rounded to bf16 before the P V product (|error| <=
    # u sum_j p_j |v_j| <= u max|v|) and o rounded once more (u max|v|): 2 u max|v|. float32: the float64
    # summation bound above with float32's eps (the fp32 kernels do not use TF32).
    if dtype == torch.bfloat16:
        out_tol = 2 * BF16_U * v.abs().max().item()
    else:
        out_tol = 8 * seq * torch.finfo(torch.float32).eps * max(1.0, v.abs().max().item())
    torch.testing.assert_close(out.double() * valid, ref * valid, rtol=0, atol=out_tol)
    # Gradients: no simple a-priori bound for the low-precision backward, so the packed path must be no
    # less accurate than the masked path it replaces (factor 2, plus one unit roundoff of the largest value).
    u = BF16_U if dtype == torch.bfloat16 else torch.finfo(torch.float32).eps
    for name, got, old, want in zip("qkv", grads, masked_grads, ref_grads):
        err, old_err = ((x.double() - want).abs().max().item() for x in (got, old))
        assert err <= 2 * old_err + u * want.abs().max().item(), (name, err, old_err)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformer_on_cuda_bf16_packed_is_as_accurate_as_masked_sdpa():
    """The tiny transformer in bf16 on CUDA: packed attention (varlen flash) against diffusers' masked SDPA,
    both against the float64 model on the same weights: the packed model is no less accurate."""
    base = twin_model(0)
    inputs64 = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in transformer_inputs(RAGGED).items()}
    inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs64.items()}
    ref = plain_copy(base).double().cuda()(**inputs64)[0]
    ours = twin_model(0).to("cuda", torch.bfloat16)
    configure_attention(ours, "_native_flash")
    masked = plain_copy(base).to("cuda", torch.bfloat16)
    with torch.no_grad():
        out, paths = path_calls_during(lambda: ours(**inputs)[0])
        out_masked = masked(**inputs)[0]
    assert set(paths) <= {"varlen_torch", "varlen_flash_attn"} and sum(paths.values()) == 2
    err = (out.double() - ref).abs().max().item()
    err_masked = (out_masked.double() - ref).abs().max().item()
    assert err <= 2 * err_masked + BF16_U * ref.abs().max().item(), (err, err_masked)
