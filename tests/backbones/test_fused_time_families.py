"""SD3.5, Z-Image and SANA (OpenUni) with ``kernels="triton"`` (the fused dual-time embedding under their
``SD35`` / ``Z_IMAGE`` / ``SANA`` rule) against ``kernels="eager"`` (their own combine), on tiny models,
forward and gradients.

The check is split where the two models differ, as Qwen-Image's (test_qwen_transformer.py):

1. everything after the time embedding is the same computation: given the fused model's embedding, the
   eager model's output and the gradient reaching the embedding are bitwise the fused model's;
2. the embedding and the gradients of the embedders' weights (for SD3 also of the pooled-text
   projections), seeded with that same gradient, match eager within the kernel tests' tolerance
   (tests/kernels/test_dual_time_rules.py, ``tolerance``): both paths do the same operations and
   round at the same module boundaries; what differs is the order of the products in each float32 dot
   (tiles vs BLAS), which moves a dot of K terms by rounding noise growing like sqrt(K) u of its terms'
   scale (u = 2**-24), numpy's vs torch's sin/cos (2 ulp) and where the combine rounds (Z-Image's
   eager combine is float64, the kernel's float32: one more rounding). So
   ``max|fused - eager| / max|eager| <= 4 sqrt(K) u``, K the summed length of the dots an output passes
   through: the 256 sinusoid channels and the hidden width H for the embedding, plus the output width
   D and the batch B for a weight gradient, plus the pooled width for SD3's text projections (one
   more dot, over its input). SANA's embedding has two outputs: the embedded timestep (K = 256 + H)
   and the modulation ``linear(silu(emb_i))``, computed by the same torch op on the kernel's ``emb_i``
   (one more dot, over D: K = 256 + H + D); the gradient reaching the embedders through the
   modulation passes that linear backwards (a dot over its 6D outputs), so every SANA time-embedder
   gradient gets K = 256 + H + D + B + 6D. A wrong weight, a dropped term or a missing extra input
   moves a value by O(1) of its scale, orders of magnitude above this (about 1e-4 here).

SANA also keeps its identity with diffusers at ``t == tt`` under the kernel: the fused model's output
is bitwise diffusers' ``SanaTransformer2DModel`` given the kernel's ``emb_1`` as its timestep MLP output,
whatever ``time_embed_2`` holds, and that ``emb_1`` is diffusers' own within the bound above.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import sd35_helpers
import z_image_helpers
from openuni_helpers import plain_sana, sana_inputs, signed_timesteps, twin_sana
from qwen_helpers import randomize_
from twinflow.backbones.openuni.tiny import tiny_transformer_config as sana_config
from twinflow.backbones.openuni.transformer import FUSED_TIME_LINEARS, TwinFlowSanaTransformer
from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer
from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer

SINUSOID = 256


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("twinflow.kernels.dual_time_embedding")
    from twinflow.kernels._common import interpreter_enabled

    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")


def tolerance(reduction: int) -> float:
    """The kernel tests' float32 bound (module docstring): ``4 sqrt(K) u``."""
    return 4 * math.sqrt(reduction) * 2.0**-24


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def intercept(model, replace=None):
    """Record each call of ``model._dual_time_embedding`` as a tuple of its outputs (one tensor, or
    SANA's modulation and embedded timestep), which keep their gradients; with ``replace`` (a tuple of
    leaves), the model continues with those instead of its own embedding."""
    record, real = {}, model._dual_time_embedding

    def embedding(*args):
        out = real(*args)
        record["temb"] = out if isinstance(out, tuple) else (out,)
        if replace is None:
            for x in record["temb"]:
                x.retain_grad()
            return out
        return replace if isinstance(out, tuple) else replace[0]

    model._dual_time_embedding = embedding
    return record


def compare(eager, fused, run, params, embedding_reductions: tuple[int, ...], param_reduction):
    """Parts 1 and 2 of the module docstring for one family; ``run(model)`` returns the loss and the
    output, ``params`` the names of the parameters whose gradients are compared, with the K of each
    embedding output in ``embedding_reductions`` and ``param_reduction(name)`` the K of a gradient."""
    fused_record = intercept(fused)
    loss_f, out_f = run(fused)
    loss_f.backward()
    temb_f = fused_record["temb"]
    grads = tuple(x.grad for x in temb_f)
    leaves = tuple(x.detach().clone().requires_grad_() for x in temb_f)
    eager_record = intercept(eager, replace=leaves)
    loss_e, out_e = run(eager)
    loss_e.backward()
    # 1. After the embedding: the same computation, bit for bit, both ways.
    assert torch.equal(out_e, out_f)
    assert all(torch.equal(leaf.grad, grad) for leaf, grad in zip(leaves, grads))
    # 2. The embedding, and the embedders' weight gradients seeded with the same gradient.
    temb_e = eager_record["temb"]
    assert len(temb_e) == len(temb_f) == len(embedding_reductions)
    for out_fused, out_eager, reduction in zip(temb_f, temb_e, embedding_reductions):
        assert rel_err(out_fused, out_eager) <= tolerance(reduction)
    torch.autograd.backward(temb_e, tuple(grad.to(x.dtype) for grad, x in zip(grads, temb_e)))
    got, want = dict(fused.named_parameters()), dict(eager.named_parameters())
    for name in params:
        assert want[name].grad is not None and want[name].grad.abs().max() > 0, name
        assert rel_err(got[name].grad, want[name].grad) <= tolerance(param_reduction(name)), name


def fused_copy(eager, cls, config, rule: str):
    """A ``kernels="triton"`` model with ``eager``'s weights (and no state-dict keys of its own)."""
    fused = cls(**config, kernels="triton").eval()
    fused.load_state_dict(eager.state_dict())
    assert set(fused.state_dict()) == set(eager.state_dict()) and fused.fused_time_embed.rule.name == rule
    return fused


def test_sd35_triton_matches_eager():
    eager = sd35_helpers.twin_model(seed=7)
    fused = fused_copy(eager, TwinFlowSD3Transformer, sd35_helpers.CFG, "sd35")
    t = sd35_helpers.signed_times()
    tt = t * torch.tensor([0.5, 1.0, 0.0])
    kw = sd35_helpers.inputs()
    weight = torch.randn_like(eager(timestep=t, **kw)[0])

    def run(model):
        out = model(timestep=t, target_timestep=tt, **kw)[0]
        return (out * weight).sum(), out.detach()

    params = [n for n, _ in eager.named_parameters() if n.startswith(("time_text_embed.", "time_text_embed_2."))]
    assert any("text_embedder" in n for n in params)
    emb = eager.time_text_embed
    hidden, width = emb.timestep_embedder.linear_1.out_features, emb.timestep_embedder.linear_2.out_features
    pooled = sd35_helpers.CFG["pooled_projection_dim"]
    compare(eager, fused, run, params, (SINUSOID + hidden,),
            lambda name: SINUSOID + hidden + width + len(t) + (pooled if "text_embedder" in name else 0))


def test_z_image_triton_matches_eager():
    eager = z_image_helpers.twin_model(seed=7)
    fused = fused_copy(eager, TwinFlowZImageTransformer, z_image_helpers.CFG, "z_image")
    t = torch.tensor([0.3, -0.7, 0.9])
    tt = torch.tensor([0.6, -0.7, 0.1])
    frames, captions = z_image_helpers.inputs()
    with torch.no_grad():
        weight = torch.randn_like(torch.stack(eager(frames, t, captions, return_dict=False)[0]))

    def run(model):
        out = torch.stack(model(frames, t, captions, return_dict=False, target_timestep=tt)[0])
        return (out * weight).sum(), out.detach()

    params = [n for n, _ in eager.named_parameters() if n.startswith(("t_embedder.", "t_embedder_2."))]
    mlp = eager.t_embedder.mlp
    hidden, width = mlp[0].out_features, mlp[2].out_features
    compare(eager, fused, run, params, (SINUSOID + hidden,), lambda name: SINUSOID + hidden + width + len(t))


def sana_fused(seed: int = 7):
    """A tiny eager TwinFlow SANA with random weights (``time_embed_2`` far from its initialisation) and
    its ``kernels="triton"`` copy."""
    eager = twin_sana(seed=seed)
    return eager, fused_copy(eager, TwinFlowSanaTransformer, sana_config(), "sana")


def compare_sana(eager, fused, params, rank: int = 0):
    """:func:`compare` on SANA's dual-time forward (rows with tt = t / 2, t, 0). K (module docstring):
    the embedded timestep 256 + H; the modulation 256 + H + D (plus a LoRA ``rank`` on its linear);
    a gradient 256 + H + D + B + 6D."""
    t, kw = signed_timesteps(), sana_inputs()
    tt = t * torch.tensor([0.5, 1.0, 0.0])
    with torch.no_grad():
        weight = torch.randn_like(eager(timestep=t, **kw)[0])

    def run(model):
        out = model(timestep=t, target_timestep=tt, **kw)[0]
        return (out * weight).sum(), out.detach()

    mlp = eager.time_embed.emb.timestep_embedder
    hidden, width = mlp.linear_1.out_features, mlp.linear_2.out_features
    modulation = eager.time_embed.linear.out_features  # 6 D
    compare(eager, fused, run, params, (SINUSOID + hidden + width + rank, SINUSOID + hidden),
            lambda name: SINUSOID + hidden + width + len(t) + modulation)


def test_sana_triton_matches_eager():
    eager, fused = sana_fused()
    params = [n for n, _ in eager.named_parameters() if n.startswith(("time_embed.", "time_embed_2."))]
    assert {n.rsplit(".", 1)[0] for n in params} == {*FUSED_TIME_LINEARS, "time_embed.linear", "time_embed_2.linear"}
    compare_sana(eager, fused, params)


def test_sana_lora_on_the_modulation_is_compatible_with_the_kernel():
    """``FUSED_TIME_LINEARS``: LoRA on the modulation linears (called as modules on the kernel's
    embeddings) runs under the kernel and matches eager (the modulation passes one more dot, over the
    LoRA rank); LoRA on one of the linears the kernel reads is refused when the kernel binds."""
    from peft import LoraConfig

    rank = 2
    eager, fused = sana_fused()
    lora = dict(r=rank, lora_alpha=rank, target_modules=["time_embed.linear", "time_embed_2.linear"])
    for model in (eager, fused):
        model.add_adapter(LoraConfig(**lora))  # freezes the rest: train the embedders too, to compare them
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(("time_embed.", "time_embed_2.")))
    randomize_(eager, seed=5, scale=0.1)  # lora_B starts at zero: make the adapters matter
    fused.load_state_dict(eager.state_dict())
    fused.bind_fused_time_embedding()  # as the shared add_lora does after peft
    params = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert sum("lora_" in n for n in params) == 4 and len(params) == 16
    compare_sana(eager, fused, params, rank)
    for name in FUSED_TIME_LINEARS:
        model = TwinFlowSanaTransformer(**sana_config(), kernels="triton")
        model.add_adapter(LoraConfig(r=rank, target_modules=[name]))
        with pytest.raises(TypeError, match="not a plain nn.Linear"):
            model.bind_fused_time_embedding()


@torch.no_grad()
def test_sana_triton_at_equal_times_is_plain_diffusers():
    _, fused = sana_fused()
    plain = plain_sana(fused)
    t, kw = signed_timesteps(), sana_inputs()
    parts = []
    fused.fused_time_embed.register_forward_hook(lambda module, args, out: parts.append(out[1][0]))
    out = fused(timestep=t, target_timestep=t, **kw)[0]
    assert len(parts) == 1
    # The fused model is diffusers' SANA given the kernel's emb_1 as its timestep MLP's output ...
    emb_1 = parts[0]
    hook = plain.time_embed.emb.register_forward_hook(lambda module, args, out: emb_1)
    assert torch.equal(out, plain(timestep=t, **kw)[0])
    hook.remove()
    # ... and that emb_1 is diffusers' own timestep MLP's within the kernel's bound.
    want = plain.time_embed.emb(t, None, None, batch_size=len(t), hidden_dtype=torch.float32)
    hidden = plain.time_embed.emb.timestep_embedder.linear_1.out_features
    assert rel_err(emb_1, want) <= tolerance(SINUSOID + hidden)
    # Whatever time_embed_2 holds; and without a target time the fused model is diffusers' model.
    randomize_(fused.time_embed_2, seed=11, scale=3.0)
    assert torch.equal(fused(timestep=t, target_timestep=t, **kw)[0], out)
    assert torch.equal(fused(timestep=t, **kw)[0], plain(timestep=t, **kw)[0])


def test_kernels_choice_is_not_saved_and_eager_is_the_default(tmp_path):
    """``kernels`` is a runtime choice: config.json (and so an export) is what it was before."""
    model = TwinFlowZImageTransformer(**z_image_helpers.CFG, kernels="triton")
    assert "kernels" not in model.config and not hasattr(TwinFlowZImageTransformer(**z_image_helpers.CFG),
                                                          "fused_time_embed")
    model.save_config(tmp_path)
    assert "kernels" not in (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="kernels"):
        TwinFlowSD3Transformer(**sd35_helpers.CFG, kernels="cuda")
    single = TwinFlowSD3Transformer(**sd35_helpers.CFG, twin_embedder=False, kernels="triton")
    assert getattr(single, "fused_time_embed", None) is None  # nothing to fuse: eager


def test_sana_kernels_choice_is_not_saved_and_old_configs_load(tmp_path):
    """As for SD3.5 and Z-Image; and a folder saved when ``kernels`` was a SANA config key (always
    ``"eager"``) still loads, as an eager model with the same weights."""
    model = twin_sana(seed=3)
    model.use_kernels("triton")
    assert "kernels" not in model.config and model.fused_time_embed.rule.name == "sana"
    assert not hasattr(TwinFlowSanaTransformer(**sana_config()), "fused_time_embed")
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    assert "kernels" not in config
    config_path.write_text(json.dumps({**config, "kernels": "eager"}))  # what the previous code saved
    loaded = TwinFlowSanaTransformer.from_pretrained(tmp_path)
    assert loaded.kernels == "eager" and "kernels" not in loaded.config
    assert getattr(loaded, "fused_time_embed", None) is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.use_kernels("triton")
    assert loaded.fused_time_embed.rule.name == "sana"
    loaded.save_pretrained(tmp_path / "again")  # the old key is not carried into a new folder
    assert "kernels" not in json.loads((tmp_path / "again" / "config.json").read_text())
    config_path.write_text(json.dumps({**config, "kernels": "triton"}))  # no code wrote this: refused
    with pytest.raises(ValueError, match="config.json key 'kernels'"):
        TwinFlowSanaTransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kernels"):
        TwinFlowSanaTransformer(**sana_config(), kernels="cuda")
    single = TwinFlowSanaTransformer(**sana_config(), twin_embedder=False, kernels="triton")
    assert getattr(single, "fused_time_embed", None) is None  # nothing to fuse: eager
