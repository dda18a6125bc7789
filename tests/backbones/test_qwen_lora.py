"""LoRA through peft: trainable-parameter counts, the EMA adapter, and the LoRA teachers."""
import pytest
import torch

from twinflow.backbones.qwen_image.config import DEFAULT_LORA_TARGETS
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.method.teachers import OnlineTeacher
from twinflow.method.teachers.adapter import AdapterEMATeacher, DisabledAdapterTeacher, adapter_pairs, adapter_state
from twinflow.method.teachers.build import build_teacher

from qwen_helpers import C, build_tiny, make_cond

RANK = 4


def lora_backbone(seed=0, **lora):
    return build_tiny(seed=seed, lora={"enabled": True, "rank": RANK, "alpha": 8.0, **lora})


def expected_lora_count(targets, rank, with_e2_full=False, with_e2_lora=False):
    """LoRA adds rank * (in + out) weights per targeted Linear; the dims follow from the config."""
    cfg = tiny_transformer_config()
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * d  # diffusers FeedForward(mult=4)
    shapes = {name: (d, d) for name in ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]}
    shapes.update({"img_mlp.net.0.proj": (d, mlp), "txt_mlp.net.0.proj": (d, mlp), "img_mlp.net.2": (mlp, d), "txt_mlp.net.2": (mlp, d)})
    total = cfg["num_layers"] * sum(rank * sum(shapes[name]) for name in targets)
    e2_linears = [(256, d), (d, d)]
    if with_e2_full:
        total += sum(i * o + o for i, o in e2_linears)
    if with_e2_lora:
        total += sum(rank * (i + o) for i, o in e2_linears)
    return total


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "lora, kwargs",
    [
        ({}, {"with_e2_full": True}),
        ({"train_time_embed_2": "lora"}, {"with_e2_lora": True}),
        ({"train_time_embed_2": "frozen", "target_modules": ["to_q", "img_mlp.net.2"]}, {}),
    ],
)
def test_trainable_parameter_counts(lora, kwargs):
    backbone = lora_backbone(**lora)
    targets = lora.get("target_modules", DEFAULT_LORA_TARGETS)
    assert trainable(backbone) == expected_lora_count(targets, RANK, **kwargs)
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert all(".default." in n for n in names)


def test_single_embedder_lora_trains_only_lora():
    backbone = build_tiny(twin_embedder=False, lora={"enabled": True, "rank": RANK})
    assert trainable(backbone) == expected_lora_count(DEFAULT_LORA_TARGETS, RANK)


@torch.no_grad()
def test_fresh_lora_leaves_the_model_unchanged():
    """LoRA B starts at zero and the time_text_embed_2 copies equal the original: exactly the base model."""
    base = build_tiny(seed=1)
    with_lora = lora_backbone(seed=1)
    assert any("time_text_embed_2.modules_to_save.default" in n for n, _ in with_lora.named_parameters())
    x, t, cond = torch.randn(2, C, 4, 4), torch.rand(2), make_cond([3, 4])
    torch.testing.assert_close(with_lora(x, t, t * 0.5, cond), base(x, t, t * 0.5, cond), rtol=0, atol=0)


def perturb_adapter_(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def snapshot(model, name):
    return {n.replace(f".{name}.", ".X."): p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def test_ema_adapter_update_first_copies_then_averages():
    backbone = lora_backbone()
    teacher = AdapterEMATeacher(backbone, decay_rate=0.6, backend="eager")
    perturb_adapter_(backbone, "default", 1)
    teacher.update()  # d = 0: a copy
    assert snapshot(backbone, "ema").keys() == snapshot(backbone, "default").keys()
    for key, value in snapshot(backbone, "default").items():
        assert torch.equal(snapshot(backbone, "ema")[key], value)
    ema_1 = snapshot(backbone, "ema")
    perturb_adapter_(backbone, "default", 2)
    teacher.update()  # d = 0 + (1 - 0) * (0.6 - 0) / 2 = 0.3
    online = snapshot(backbone, "default")
    for key, value in snapshot(backbone, "ema").items():
        expected = 0.3 * ema_1[key].double() + 0.7 * online[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


def test_bfloat16_adapters_keep_float32_masters():
    backbone = build_tiny(dtype="bfloat16", lora={"enabled": True, "rank": RANK})
    teacher = AdapterEMATeacher(backbone, decay_rate=0.5, backend="eager")
    pairs = adapter_pairs(backbone)
    assert {e.dtype for e, _ in pairs} == {torch.bfloat16}
    perturb_adapter_(backbone, "default", 3)
    teacher.update()
    perturb_adapter_(backbone, "default", 4)
    teacher.update()  # d = 0.25
    masters = teacher.state_dict()["masters"]
    assert len(masters) == len(pairs) and all(m.dtype == torch.float32 for m in masters)
    for (ema, src), master in zip(pairs, masters):
        assert torch.equal(ema, master.to(torch.bfloat16))
    fresh = AdapterEMATeacher(backbone, decay_rate=0.5, backend="eager")
    fresh.load_state_dict(teacher.state_dict())
    assert fresh.schedule.decay == teacher.schedule.decay
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict()["masters"], masters))


def flags(model):
    tuners = [m for m in model.modules() if hasattr(m, "_active_adapter")]
    return ([(m._active_adapter, m._disable_adapters) for m in tuners],
            {n: p.requires_grad for n, p in model.named_parameters()})


@torch.no_grad()
def test_ema_teacher_session_runs_the_ema_adapter_and_restores_state():
    backbone = lora_backbone()
    teacher = build_teacher(backbone, 0.9, backend="eager", lora=True)
    assert isinstance(teacher, AdapterEMATeacher)
    perturb_adapter_(backbone, "default", 5)
    perturb_adapter_(backbone, "ema", 6)
    x, t, cond = torch.randn(2, C, 4, 4), torch.rand(2), make_cond([3, 4])
    tt = t * 0.5
    online = backbone(x, t, tt, cond)
    before = flags(backbone)
    with teacher.session() as model:
        active, requires_grad = flags(backbone)
        assert {(tuple(a), d) for a, d in active} == {(("ema",), False)} and requires_grad == before[1]
        teacher_out = model(x, t, tt, cond)
        assert not torch.is_grad_enabled()
    assert flags(backbone) == before
    assert (teacher_out - online).abs().max() > 1e-3
    # The same numbers from the online path once the EMA weights are copied into the trained adapter.
    for ema, src in adapter_pairs(backbone):
        src.copy_(ema)
    torch.testing.assert_close(backbone(x, t, tt, cond), teacher_out, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_disabled_adapter_teacher_is_the_base_model():
    backbone = lora_backbone(seed=2)
    base = build_tiny(seed=2)
    teacher = build_teacher(backbone, 1.0, lora=True)
    assert isinstance(teacher, DisabledAdapterTeacher)
    perturb_adapter_(backbone, "default", 7)
    x, t, cond = torch.randn(2, C, 4, 4), torch.rand(2), make_cond([2, 4])
    before = flags(backbone)
    with teacher.session() as model:
        out = model(x, t, t * 0.2, cond)
    assert flags(backbone) == before
    torch.testing.assert_close(out, base(x, t, t * 0.2, cond), rtol=0, atol=0)
    assert (backbone(x, t, t * 0.2, cond) - out).abs().max() > 1e-3


def test_online_teacher_and_missing_ema_adapter():
    backbone = lora_backbone(ema_adapter=False)
    assert isinstance(build_teacher(backbone, 0.0, lora=True), OnlineTeacher)
    with pytest.raises(ValueError, match="lora.ema_adapter"):
        build_teacher(backbone, 0.99, lora=True)


@torch.no_grad()
def test_fused_time_embedding_follows_the_active_time_embed_2_copy():
    pytest.importorskip("twinflow.kernels.dual_time_embedding", reason="kernels/dual_time_embedding.py not written yet")
    from twinflow.kernels._common import interpreter_enabled

    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    eager = lora_backbone(seed=3)
    fused = build_tiny(seed=3, kernels="triton", lora={"enabled": True, "rank": RANK, "alpha": 8.0})
    perturb_adapter_(eager, "default", 8)
    fused.load_state_dict(eager.state_dict())
    x, t, cond = torch.randn(2, C, 4, 4), torch.rand(2), make_cond([2, 3])
    torch.testing.assert_close(fused(x, t, t * 0.3, cond), eager(x, t, t * 0.3, cond), rtol=1e-5, atol=1e-5)
    with adapter_state(fused, None), adapter_state(eager, None):
        torch.testing.assert_close(fused(x, t, t * 0.3, cond), eager(x, t, t * 0.3, cond), rtol=1e-5, atol=1e-5)
