"""SD3.5 and Z-Image with ``kernels="triton"`` (the fused dual-time embedding under their ``SD35`` /
``Z_IMAGE`` rule) against ``kernels="eager"`` (their own combine), on tiny models, forward and gradients.

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
   more dot, over its input). A wrong weight, a dropped term or a missing extra input moves a value
   by O(1) of its scale, orders of magnitude above this (about 1e-4 here).
"""
from __future__ import annotations

import math

import pytest
import torch

import sd35_helpers
import z_image_helpers
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
    """Record each call of ``model._dual_time_embedding`` (its output keeps its gradient); with
    ``replace``, the model continues with that leaf instead of its own embedding."""
    record, real = {}, model._dual_time_embedding

    def embedding(*args):
        record["temb"] = out = real(*args)
        if replace is None:
            out.retain_grad()
            return out
        return replace

    model._dual_time_embedding = embedding
    return record


def compare(eager, fused, run, params, hidden: int, width: int, batch: int, pooled: int = 0):
    """Parts 1 and 2 of the module docstring for one family; ``run(model)`` returns the loss and the
    output, ``params`` the names of the parameters whose gradients are compared (K per name)."""
    fused_record = intercept(fused)
    loss_f, out_f = run(fused)
    loss_f.backward()
    temb_f, grad_temb = fused_record["temb"], fused_record["temb"].grad
    leaf = temb_f.detach().clone().requires_grad_()
    eager_record = intercept(eager, replace=leaf)
    loss_e, out_e = run(eager)
    loss_e.backward()
    # 1. After the embedding: the same computation, bit for bit, both ways.
    assert torch.equal(out_e, out_f) and torch.equal(leaf.grad, grad_temb)
    # 2. The embedding, and the embedders' weight gradients seeded with the same gradient.
    temb_e = eager_record["temb"]
    assert rel_err(temb_f, temb_e) <= tolerance(SINUSOID + hidden)
    torch.autograd.backward(temb_e, grad_temb.to(temb_e.dtype))
    got, want = dict(fused.named_parameters()), dict(eager.named_parameters())
    for name in params:
        reduction = SINUSOID + hidden + width + batch + (pooled if "text_embedder" in name else 0)
        assert want[name].grad is not None and want[name].grad.abs().max() > 0, name
        assert rel_err(got[name].grad, want[name].grad) <= tolerance(reduction), name


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
    compare(eager, fused, run, params, hidden=emb.timestep_embedder.linear_1.out_features,
            width=emb.timestep_embedder.linear_2.out_features, batch=len(t),
            pooled=sd35_helpers.CFG["pooled_projection_dim"])


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
    compare(eager, fused, run, params, hidden=mlp[0].out_features, width=mlp[2].out_features, batch=len(t))


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
