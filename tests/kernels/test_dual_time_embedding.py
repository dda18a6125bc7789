"""Fused dual-timestep embedding: the eager reference against diffusers (bit for bit), the Triton
kernels against the reference (forward, gradients, strided and equal times), the module wrapper, the
backend switch, and the ZeRO-3 gathering of weights the module reads but does not own."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from torch import nn

from twinflow.kernels import _common
from twinflow.kernels._common import KernelBackendError, use_triton
from twinflow.kernels.dual_time_embedding import (
    DualTimestepEmbedding,
    dual_time_embedding,
    dual_time_embedding_reference,
    dual_time_embedding_triton,
    embedder_weights,
    timestep_sinusoid_pair_triton,
)

DTYPES = [torch.float32, torch.bfloat16]
# Relative error max|out - ref| / max|ref| allowed by ALGORITHM.md §5.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_embedders(width: int, dtype: torch.dtype, device, seed: int = 0):
    """Two embedders with different random weights (E2 != E1, so the combine is exercised)."""
    torch.manual_seed(seed)
    e1 = QwenTimestepProjEmbeddings(width).to(device=device, dtype=dtype)
    e2 = QwenTimestepProjEmbeddings(width).to(device=device, dtype=dtype)
    return e1, e2


def make_times(batch: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed times in [-1, 1] with tt between 0 and t; every third row has tt == t exactly."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g) * 2 - 1
    tt = t - torch.rand(batch, generator=g) * t
    tt[::3] = t[::3]
    return t.to(device), tt.to(device)


def diffusers_dual(e1: nn.Module, e2: nn.Module, t: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype):
    """The combine written over diffusers' own module forwards."""
    hidden = torch.empty(0, dtype=dtype, device=t.device)
    return e1(t, hidden) + e2(tt, hidden) * (t.float() - tt.float()).to(dtype)[:, None]


def weights_of(e1: nn.Module, e2: nn.Module) -> list[torch.Tensor]:
    return list(embedder_weights(e1) + embedder_weights(e2))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 units in the last place (ordered integer representation)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


# ------------------------------------------------------------------------------------------------
# Eager reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [48, 3072])
def test_reference_is_diffusers_bit_for_bit(dtype, width):
    e1, e2 = make_embedders(width, dtype, "cpu")
    t, tt = make_times(9, "cpu")
    ref = dual_time_embedding_reference(t, tt, *weights_of(e1, e2), dtype)
    assert ref.dtype == dtype and ref.shape == (9, width)
    assert torch.equal(ref, diffusers_dual(e1, e2, t, tt, dtype))
    # t == tt everywhere: exactly the pretrained embedder (ALGORITHM.md §2).
    assert torch.equal(dual_time_embedding_reference(t, t, *weights_of(e1, e2), dtype),
                       e1(t, torch.empty(0, dtype=dtype)))


# ------------------------------------------------------------------------------------------------
# Kernel (a): the two sinusoids
# ------------------------------------------------------------------------------------------------

def test_sinusoid_kernel_matches_diffusers(device, poisoned_allocations):
    base = torch.linspace(-1, 1, 3 * 701, device=device)
    t = base[::3]  # strided view
    tt = torch.cat([torch.tensor([0.0, 1.0, -1.0, 1e-3]), torch.rand(697) * 2 - 1]).to(device)
    with poisoned_allocations() as record:
        proj = timestep_sinusoid_pair_triton(t, tt, 256, torch.float32)
        proj_bf16 = timestep_sinusoid_pair_triton(t, tt, 256, torch.bfloat16)
    assert record.count >= 2
    expected = torch.stack([get_timestep_embedding(x, 256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
                            for x in (t, tt)])
    if device.type == "cuda":  # libdevice sin/cos are the CUDA math library torch uses
        assert torch.equal(proj, expected)
    else:
        # numpy's and torch's CPU sin/cos are each within 1 ulp of the exact value (1 measured).
        # Any change in the order of the float32 operations moves arguments up to 1000 rad by an ulp,
        # i.e. sin/cos by hundreds of ulps, so this bound pins the computation.
        assert ulp_distance(proj, expected).max().item() <= 2
    # The bf16 output is the round-to-nearest-even of the float32 one.
    assert torch.equal(proj_bf16, proj.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# Forward kernels against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [32, 48, 96])
@pytest.mark.parametrize("batch", [1, 3, 16, 17, 64])
def test_forward_matches_reference(device, batch, width, dtype, poisoned_allocations):
    e1, e2 = make_embedders(width, dtype, device, seed=batch)
    t, tt = make_times(batch, device, seed=width)
    ref = dual_time_embedding_reference(t, tt, *weights_of(e1, e2), dtype)
    with poisoned_allocations() as record:
        out = dual_time_embedding(t, tt, e1, e2, dtype, backend="triton")
    assert record.count > 0
    assert out.dtype == dtype and out.shape == (batch, width)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("batch", [1, 4, 16, 64])
def test_combine_grid_covers_every_sm_at_qwen_width(batch):
    """Issue 12 item 7: the Linear2 + combine launch at D = 3072 has at least one program per SM of
    an H200 (132), and its reduction step (hence the summation order) does not depend on the SMs."""
    from twinflow.kernels.dual_time_embedding_triton import _tiles

    tiles = _tiles(batch, 3072, 256, 132)
    programs = -(-batch // tiles.b) * -(-3072 // tiles.n2)
    assert programs >= 132, tiles
    assert tiles.n == _tiles(batch, 3072, 256, 1).n == 64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_forward_and_gradients_at_qwen_width(batch, dtype, poisoned_allocations):
    e1, e2 = make_embedders(3072, dtype, "cuda")
    t, tt = make_times(batch, "cuda")
    weights = weights_of(e1, e2)
    grad = torch.randn(batch, 3072, device="cuda").to(dtype)
    ref = dual_time_embedding_reference(t, tt, *weights, dtype)
    with poisoned_allocations():
        out = dual_time_embedding(t, tt, e1, e2, dtype, backend="triton")
        grads = torch.autograd.grad(out, weights, grad)
    assert rel_err(out, ref) <= TOL[dtype]
    for got, want in zip(grads, torch.autograd.grad(ref, weights, grad)):
        assert rel_err(got, want) <= TOL[dtype]


def test_strided_times(device):
    e1, e2 = make_embedders(48, torch.float32, device)
    table = torch.rand(11, 3, device=device) * 2 - 1
    t = table[:, 1]  # stride 3
    tt = (t.clone() * 0.5).repeat_interleave(2)[::2]  # stride 2
    assert t.stride(0) == 3 and tt.stride(0) == 2
    out = dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    assert torch.equal(out, dual_time_embedding(t.contiguous(), tt.contiguous(), e1, e2, torch.float32, "triton"))
    assert rel_err(out, dual_time_embedding_reference(t, tt, *weights_of(e1, e2), torch.float32)) <= 1e-5
    # A broadcast time (stride 0), e.g. one sampler step for the whole batch.
    t0 = torch.tensor(0.75, device=device).expand(11)
    out0 = dual_time_embedding(t0, tt, e1, e2, torch.float32, backend="triton")
    assert torch.equal(out0, dual_time_embedding(t0.contiguous(), tt.contiguous(), e1, e2, torch.float32, "triton"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_times_give_the_first_embedder(device, dtype):
    e1, e2 = make_embedders(48, dtype, device)
    _, other = make_embedders(48, dtype, device, seed=7)
    t, tt = make_times(12, device)
    equal = t == tt
    assert equal.any() and (~equal).any()
    out = dual_time_embedding(t, tt, e1, e2, dtype, backend="triton")
    out_other_e2 = dual_time_embedding(t, tt, e1, other, dtype, backend="triton")
    # Rows with t == tt do not depend on E2 at all (bitwise); the others do.
    assert torch.equal(out[equal], out_other_e2[equal])
    assert not torch.equal(out[~equal], out_other_e2[~equal])
    e1_alone = e1(t, torch.empty(0, dtype=dtype, device=device))
    assert rel_err(out[equal], e1_alone[equal]) <= TOL[dtype]
    # The reference reproduces the pretrained model exactly on those rows.
    ref = dual_time_embedding_reference(t, tt, *weights_of(e1, e2), dtype)
    assert torch.equal(ref[equal], e1_alone[equal])


# ------------------------------------------------------------------------------------------------
# Backward kernels against eager autograd
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "width"), [(1, 32), (5, 48), (64, 96)])
def test_gradients_match_eager_autograd(device, batch, width, dtype, poisoned_allocations):
    e1, e2 = make_embedders(width, dtype, device, seed=batch)
    t, tt = make_times(batch, device, seed=batch)
    weights = weights_of(e1, e2)
    grad = torch.randn(batch, width, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    with poisoned_allocations() as record:
        out = dual_time_embedding(t, tt, e1, e2, dtype, backend="triton")
        grads = torch.autograd.grad(out, weights, grad)
    assert record.count > 0
    ref = dual_time_embedding_reference(t, tt, *weights, dtype)
    for name, got, want in zip(("w1_1", "b1_1", "w2_1", "b2_1", "w1_2", "b1_2", "w2_2", "b2_2"),
                               grads, torch.autograd.grad(ref, weights, grad)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.isfinite(got).all(), name
        if want.abs().max() == 0:  # E2's gradients vanish when every row has t == tt (batch 1)
            assert torch.equal(got, want), name
        else:
            assert rel_err(got, want) <= TOL[dtype], name


def test_gradients_only_for_trainable_tensors(device):
    e1, e2 = make_embedders(32, torch.float32, device)
    e1.requires_grad_(False)
    t, tt = make_times(6, device)
    out = dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    out.square().sum().backward()
    assert all(p.grad is None for p in e1.parameters())
    ref_e2 = [p.detach().clone().requires_grad_(True) for p in embedder_weights(e2)]
    ref = dual_time_embedding_reference(t, tt, *embedder_weights(e1), *ref_e2, torch.float32)
    ref.square().sum().backward()
    for p, want in zip(embedder_weights(e2), ref_e2):
        assert rel_err(p.grad, want.grad) <= 1e-5
    with torch.no_grad():
        assert dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton").grad_fn is None


def test_times_that_require_grad():
    e1, e2 = make_embedders(32, torch.float32, "cpu")
    t, tt = make_times(4, "cpu")
    t.requires_grad_(True)
    with pytest.raises(KernelBackendError, match="no gradient for t / tt"):
        dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    out = dual_time_embedding(t, tt, e1, e2, torch.float32, backend="auto")  # falls back to eager
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


# ------------------------------------------------------------------------------------------------
# Module wrapper and backend switch
# ------------------------------------------------------------------------------------------------

class _Parent(nn.Module):
    """The shape of the backbone: two embedders plus the fused module as a submodule."""

    def __init__(self, width: int, backend: str):
        super().__init__()
        self.time_text_embed = QwenTimestepProjEmbeddings(width)
        self.time_text_embed_2 = QwenTimestepProjEmbeddings(width)
        self.fused_time_embed = DualTimestepEmbedding(self.time_text_embed, self.time_text_embed_2, backend)


def test_module_owns_no_parameters_or_keys():
    parent = _Parent(32, "auto")
    assert list(parent.fused_time_embed.parameters()) == []
    assert parent.fused_time_embed.state_dict() == {}
    keys = set(parent.state_dict())
    assert keys and all(k.startswith(("time_text_embed.", "time_text_embed_2.")) for k in keys)
    assert len(list(parent.parameters())) == 8


@pytest.mark.parametrize("backend", ["eager", "triton", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_diffusers(backend, dtype):
    parent = _Parent(48, backend).to(dtype)
    t, tt = make_times(7, "cpu")
    expected = diffusers_dual(parent.time_text_embed, parent.time_text_embed_2, t, tt, dtype)
    out = parent.fused_time_embed(t, tt, dtype)
    if backend == "eager":
        assert torch.equal(out, expected)
    else:
        assert rel_err(out, expected) <= TOL[dtype]


def test_bad_inputs_name_the_problem():
    e1, e2 = make_embedders(32, torch.float32, "cpu")
    t, tt = make_times(4, "cpu")
    wide = QwenTimestepProjEmbeddings(48)
    with pytest.raises(ValueError, match="w1_2 has shape"):
        dual_time_embedding(t, tt, e1, wide, torch.float32, backend="eager")
    with pytest.raises(ValueError, match="w1_1 is torch.float32 but the embedding dtype is torch.bfloat16"):
        dual_time_embedding(t, tt, e1, e2, torch.bfloat16, backend="triton")
    with pytest.raises(ValueError, match="t must be a 1-D tensor"):
        dual_time_embedding(t[:, None], tt, e1, e2, torch.float32, backend="triton")
    with pytest.raises(ValueError, match="same non-empty shape"):
        dual_time_embedding(t, tt[:3], e1, e2, torch.float32, backend="eager")
    with pytest.raises(ValueError, match="backend must be one of"):
        DualTimestepEmbedding(e1, e2, backend="cuda")
    with pytest.raises(KernelBackendError, match="unknown kernel backend"):
        dual_time_embedding(t, tt, e1, e2, torch.float32, backend="fast")
    e2.time_proj.scale = 1
    with pytest.raises(ValueError, match="embed_2.time_proj"):
        DualTimestepEmbedding(e1, e2)
    with pytest.raises(TypeError, match="embed_1 must be a diffusers timestep embedding"):
        DualTimestepEmbedding(nn.Linear(2, 2), e2)


def test_lora_wrapped_embedder_is_refused():
    from peft import LoraConfig, inject_adapter_in_model

    e1, e2 = make_embedders(32, torch.float32, "cpu")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear_1"]), e2)
    with pytest.raises(TypeError, match=r"embed_2\.timestep_embedder\.linear_1 .*not a plain nn.Linear"):
        DualTimestepEmbedding(e1, e2, backend="triton")


def test_weights_are_checked_once_and_changes_are_detected(monkeypatch):
    """Host path (issue 12 item 5): the full weight validation and the embedder inspection run once
    for a pair of embedders; a weight re-typed or reshaped, or a Linear replaced (LoRA injected), after
    the first call is still caught on the next call."""
    import twinflow.kernels.dual_time_embedding as dte
    from peft import LoraConfig, inject_adapter_in_model

    checks = []
    real_validate, real_weights = dte._validate, dte._inspect
    monkeypatch.setattr(dte, "_validate", lambda *a: checks.append("validate") or real_validate(*a))
    monkeypatch.setattr(dte, "_inspect", lambda *a: checks.append("embedder") or real_weights(*a))
    e1, e2 = make_embedders(32, torch.float32, "cpu", seed=11)
    t, tt = make_times(3, "cpu")
    first = dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    for _ in range(3):
        assert torch.equal(dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton"), first)
    assert checks.count("validate") == 1 and checks.count("embedder") == 2
    lin2 = e1.timestep_embedder.linear_2
    lin2.weight.data = lin2.weight.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"w2_1 is torch.bfloat16 but the embedding dtype is torch.float32"):
        dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    lin2.weight.data = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"w2_1 has shape \(32, 16\), expected \(32, 32\)"):
        dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    lin2.weight.data = torch.randn(32, 32)
    dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear_1"]), e2)
    with pytest.raises(TypeError, match=r"embed_2\.timestep_embedder\.linear_1 .*not a plain nn.Linear"):
        dual_time_embedding(t, tt, e1, e2, torch.float32, backend="triton")


def test_backend_selection(monkeypatch):
    x = torch.zeros(2)
    assert use_triton(x, backend="eager") is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x, None, backend="auto") is True
    assert use_triton(x, backend="triton") is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert use_triton(x, backend="auto") is False
    with pytest.raises(KernelBackendError, match="CPU tensors and Triton's interpreter is off"):
        use_triton(x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelBackendError, match="do not support device type 'meta'"):
        use_triton(torch.zeros(2, device="meta"), backend="triton")
    with pytest.raises(KernelBackendError, match="mixed devices"):
        use_triton(x, torch.zeros(2, device="meta"), backend="auto")
    monkeypatch.setattr(_common, "triton_installed", lambda: False)
    with pytest.raises(KernelBackendError, match="'triton' package is not installed"):
        use_triton(x, backend="triton")


def test_auto_without_interpreter_runs_the_reference(monkeypatch):
    e1, e2 = make_embedders(32, torch.bfloat16, "cpu")
    t, tt = make_times(5, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = dual_time_embedding(t, tt, e1, e2, torch.bfloat16, backend="auto")
    assert torch.equal(out, diffusers_dual(e1, e2, t, tt, torch.bfloat16))
    with pytest.raises(KernelBackendError):
        dual_time_embedding_triton(t, tt, *weights_of(e1, e2), torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (one CPU rank in a subprocess: distributed state must not leak into this process)
# ------------------------------------------------------------------------------------------------

_ZERO3_SCRIPT = textwrap.dedent('''
    import json, os
    import torch, deepspeed
    from torch import nn
    from deepspeed.utils import safe_get_full_grad
    from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
    from twinflow.kernels.dual_time_embedding import DualTimestepEmbedding, dual_time_embedding_reference

    deepspeed.init_distributed(dist_backend="gloo")
    from twinflow.training.distributed import release_cpu_shm_name

    release_cpu_shm_name()  # DeepSpeed leaves its /dev/shm workspace otherwise
    CFG = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "Adam", "params": {"lr": 0.0, "torch_adam": True}}}

    class Parent(nn.Module):
        def __init__(self, attach):
            super().__init__()
            self.time_text_embed = QwenTimestepProjEmbeddings(32)
            self.time_text_embed_2 = QwenTimestepProjEmbeddings(32)
            fused = DualTimestepEmbedding(self.time_text_embed, self.time_text_embed_2, backend="triton")
            if attach:
                self.fused_time_embed = fused
            else:  # hidden from DeepSpeed: no hooks will gather for it
                self._hidden = (fused,)

        def forward(self, t, tt):
            fused = self.fused_time_embed if hasattr(self, "fused_time_embed") else self._hidden[0]
            return fused(t, tt, torch.float32)

    def run(model):
        engine, *_ = deepspeed.initialize(model=model, config=CFG, model_parameters=model.parameters())
        embedders = (engine.module.time_text_embed, engine.module.time_text_embed_2)
        params = [p for e in embedders for p in e.timestep_embedder.parameters()]
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
        t, tt = torch.rand(5), torch.rand(5)
        try:
            out = engine(t, tt)
        except RuntimeError as err:
            return {"partitioned": partitioned, "error": str(err)}
        engine.backward(out.square().sum())
        with deepspeed.zero.GatheredParameters(params):
            full = [p.detach().clone().requires_grad_(True) for p in params]
        ref = dual_time_embedding_reference(t, tt, *full, torch.float32)
        grads = torch.autograd.grad(ref.square().sum(), full)
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        return {"partitioned": partitioned, "keys": sorted(engine.module.state_dict()),
                "forward": rel(out.detach(), ref.detach()),
                "grads": [rel(safe_get_full_grad(p), g) for p, g in zip(params, grads)]}

    torch.manual_seed(0)
    result = {}
    with deepspeed.zero.Init(config_dict_or_path=CFG):
        result["zero_init"] = run(Parent(attach=True))
    result["converted_by_initialize"] = run(Parent(attach=True))
    with deepspeed.zero.Init(config_dict_or_path=CFG):
        result["not_a_submodule"] = run(Parent(attach=False))
    print("RESULT " + json.dumps(result))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_gathers_the_weights_it_reads(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_dual_time.py"
    script.write_text(_ZERO3_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])

    for case in ("zero_init", "converted_by_initialize"):
        got = result[case]
        assert got["partitioned"], case
        assert all(k.startswith(("time_text_embed.", "time_text_embed_2.")) for k in got["keys"]), case
        assert got["forward"] <= 1e-5, case
        assert len(got["grads"]) == 8 and max(got["grads"]) <= 1e-5, case
    hidden = result["not_a_submodule"]
    assert hidden["partitioned"]
    assert "is not gathered" in hidden["error"]
