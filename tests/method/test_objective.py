"""The training step (§3) on a small MLP backbone: what each preset runs, batched teacher passes."""
import copy

import pytest
import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.method.config import GroupProbs, TwinFlowConfig
from twinflow.method.objective import TwinFlowObjective, invert
from twinflow.method.teachers import OnlineTeacher, Teacher
from twinflow.method.teachers.build import build_teacher
from twinflow.method.teachers.dense import FrozenTeacher

B = 16


class Recorder(torch.nn.Module):
    """Wraps a backbone and records every call: rows, signed times, grad mode."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x, t, tt, cond):
        self.calls.append({"rows": x.shape[0], "t": t.clone(), "tt": tt.clone(), "grad": torch.is_grad_enabled()})
        return self.model(x, t, tt, cond)


def run(preset, seed=0, **overrides):
    torch.manual_seed(seed)
    net = DualTimeMLP(num_classes=3, width=32, depth=1)
    online = Recorder(net)
    teacher_rec = Recorder(copy.deepcopy(net))
    cfg = TwinFlowConfig(preset=preset, kernels="eager", **overrides)
    obj = TwinFlowObjective(cfg)
    x = torch.randn(B, 2)
    c = torch.randint(0, 3, (B,))
    u = torch.full((B,), 3)
    out = obj.training_step(online, x, c, u, Teacher(teacher_rec))
    return out, online, teacher_rec, cfg


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("twinflow", {"adv_fake", "main", "guidance", "rcgm", "rectification"}),
        ("rcgm_theory", {"main", "guidance", "rcgm"}),
        ("rcgm_practice", {"main", "guidance", "rcgm"}),
        ("flow_matching", {"main"}),
        ("lora_1order", {"adv_fake", "main", "guidance", "rcgm", "rectification"}),
    ],
)
def test_each_preset_runs_exactly_its_passes(preset, expected):
    out, online, teacher, cfg = run(preset)
    assert set(out.forward_rows) == expected
    assert torch.isfinite(out.loss)
    # only the main pass carries gradient
    assert [c["grad"] for c in online.calls].count(True) == 1
    assert not any(c["grad"] for c in teacher.calls)
    if "rcgm" in expected:
        n_rows = int((~out.split.masks()["adv"]).sum())
        assert out.forward_rows["rcgm"] == cfg.estimate_order * n_rows
        assert len([c for c in teacher.calls]) == cfg.estimate_order + ("guidance" in expected)
    if preset == "rcgm_practice":
        assert out.rect_loss.item() == 0.0


def test_guidance_is_one_batched_teacher_forward_and_equals_separate_passes():
    out, online, teacher, cfg = run("twinflow", ema_decay_rate=0.5)
    guidance_call = teacher.calls[0]
    n = out.forward_rows["guidance"] // 2
    assert guidance_call["rows"] == 2 * n and n > 0
    assert torch.equal(guidance_call["t"], guidance_call["tt"])  # instantaneous: tt = t (signed)
    net = teacher.model
    x = torch.randn(n, 2)
    t = guidance_call["t"][:n]
    c = torch.randint(0, 3, (n,))
    u = torch.full((n,), 3)
    with torch.no_grad():
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([c, u]))
        torch.testing.assert_close(both[:n], net(x, t, t, c), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(both[n:], net(x, t, t, u), rtol=1e-6, atol=1e-6)


def test_rectification_is_one_batched_online_forward_with_twin_times():
    out, online, teacher, cfg = run("twinflow")
    n_e2e = out.split.sizes["e2e"]
    rect = online.calls[-1]
    assert rect["rows"] == 2 * n_e2e and not rect["grad"]
    sigma = rect["t"][n_e2e:]
    assert torch.equal(rect["t"][:n_e2e], -sigma) and torch.equal(rect["t"], rect["tt"])
    assert torch.all((sigma >= 0) & (sigma <= 1))


def test_adv_rows_use_one_step_fakes_of_the_online_model():
    out, online, teacher, cfg = run("twinflow")
    fake_call = online.calls[0]
    n_adv = out.split.sizes["adv"]
    assert fake_call["rows"] == n_adv and not fake_call["grad"]
    assert torch.all(fake_call["t"] == 1) and torch.all(fake_call["tt"] == 0)
    main = online.calls[1]
    adv = out.split.slices["adv"]
    assert torch.all(main["t"][adv] < 0) and torch.equal(main["t"][adv], main["tt"][adv])


def test_rcgm_grid_goes_from_t_minus_delta_to_tt():
    out, online, teacher, cfg = run("rcgm_theory", ema_decay_rate=0.5)
    main = online.calls[0]
    t, tt = main["t"], main["tt"]
    first, second = teacher.calls[1], teacher.calls[2]
    t_m = torch.maximum(t - 0.01, tt)
    torch.testing.assert_close(first["t"], t_m)
    torch.testing.assert_close(first["tt"], t_m / 2 + tt / 2)
    torch.testing.assert_close(second["tt"], tt)


def test_rcgm_with_frozen_teacher_setting_uses_online_model():
    out, online, teacher, cfg = run("twinflow", ema_decay_rate=1.0)
    # guidance still uses the teacher; the RCGM integration runs on the online model (no grad)
    assert len(teacher.calls) == 1
    assert sum(1 for c in online.calls if not c["grad"]) == 1 + cfg.estimate_order + 1  # adv, rcgm x N, rect


def test_flow_matching_loss_is_weighted_mse_on_mul_rows():
    from twinflow.method.config import LossFuncConfig

    torch.manual_seed(3)
    net = DualTimeMLP(width=16, depth=1)
    cfg = TwinFlowConfig(preset="flow_matching", loss_func=LossFuncConfig("l2"), kernels="eager")
    obj = TwinFlowObjective(cfg)
    x = torch.randn(8, 2)
    torch.manual_seed(11)
    out = obj.training_step(net, x, None, None, OnlineTeacher(net))
    # replay the random draws: t, u1, u2, then z
    torch.manual_seed(11)
    t = torch.rand(8)
    torch.rand(8)
    u2 = torch.rand(8)
    z = torch.randn(8, 2)
    t_min = t - u2 * t * 0.0  # cor = 0
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    with torch.no_grad():
        F = net(x_t, t, t_min, None)
    w = torch.tan((1 - (t - t_min)) * torch.pi / 2.5) + 1
    expected = (((F - (z - x)) ** 2).mean(1) * w).mean()
    torch.testing.assert_close(out.base_loss, expected)


def test_image_free_replaces_the_batch_with_one_step_samples():
    out, online, teacher, cfg = run("twinflow", use_image_free=True)
    first = online.calls[0]
    assert first["rows"] == B and torch.all(first["t"] == 1) and torch.all(first["tt"] == 0)


def test_enhanced_ratio_without_uncond_is_a_clear_error():
    net = DualTimeMLP(width=16, depth=1)
    obj = TwinFlowObjective(TwinFlowConfig(kernels="eager"))
    with pytest.raises(ValueError, match="unconditional"):
        obj.training_step(net, torch.randn(8, 2), None, None, OnlineTeacher(net))


def test_teacher_modes():
    net = DualTimeMLP(width=16, depth=1)
    assert isinstance(build_teacher(net, 0.0), OnlineTeacher)
    frozen = build_teacher(net, 1.0)
    assert isinstance(frozen, FrozenTeacher) and frozen.model is not net
    ema = build_teacher(net, 0.9, backend="eager")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()  # first update copies
    for pe, p in zip(ema.model.parameters(), net.parameters()):
        assert torch.equal(pe, p)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()  # d = 0.45: ema = 0.45 ema + 0.55 theta
    for pe, b, p in zip(ema.model.parameters(), before, net.parameters()):
        torch.testing.assert_close(pe, 0.45 * b + 0.55 * p)
    x = torch.randn(4, 2)
    t = torch.rand(4)
    with ema.session() as teacher_model:
        assert not torch.is_grad_enabled()
        teacher_model(x, t, t, None)


def test_invert_uses_absolute_time():
    x = torch.randn(3, 2)
    F = torch.randn(3, 2)
    t = torch.tensor([0.3, -0.3, 1.0])
    xh, zh = invert(x, t, F)
    torch.testing.assert_close(xh[0], x[0] - 0.3 * F[0])
    torch.testing.assert_close(xh[1], x[1] - 0.3 * F[1])
    torch.testing.assert_close(zh[2], x[2])


class InPlaceTeacher(Teacher):
    """Like the ZeRO-3 frozen-shard and disabled-adapter teachers: the session changes the SAME module."""

    def __init__(self, model):
        super().__init__(model)
        model.swapped = False

    def session(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.model.swapped = True
            try:
                with torch.no_grad():
                    yield self.model
            finally:
                self.model.swapped = False

        return ctx()


class FlagRecorder(Recorder):
    def forward(self, x, t, tt, cond):
        self.calls.append({"rows": x.shape[0], "swapped": self.swapped, "grad": torch.is_grad_enabled()})
        return self.model(x, t, tt, cond)


@pytest.mark.parametrize("emd, rcgm_swapped", [(1.0, False), (0.5, True)])
def test_rcgm_runs_on_the_online_weights_when_ema_decay_rate_is_one(emd, rcgm_swapped):
    torch.manual_seed(0)
    rec = FlagRecorder(DualTimeMLP(num_classes=3, width=32, depth=1))
    obj = TwinFlowObjective(TwinFlowConfig(ema_decay_rate=emd, kernels="eager"))
    x, c, u = torch.randn(B, 2), torch.randint(0, 3, (B,)), torch.full((B,), 3)
    out = obj.training_step(rec, x, c, u, InPlaceTeacher(rec))
    n_rcgm = int((~out.split.masks()["adv"]).sum())
    rcgm_calls = [call for call in rec.calls if call["rows"] == n_rcgm and not call["grad"]]
    assert len(rcgm_calls) == 2
    assert all(call["swapped"] == rcgm_swapped for call in rcgm_calls)
    guidance = [call for call in rec.calls if call["rows"] == out.forward_rows["guidance"] and not call["grad"]]
    assert guidance and all(call["swapped"] for call in guidance)  # guidance always uses the teacher


def test_estimate_order_zero_averages_over_mul_and_adv_rows_only():
    seen = {}
    obj = TwinFlowObjective(TwinFlowConfig(preset="flow_matching", probs=GroupProbs(e2e=1, mul=1, any=0, adv=1, one=0), kernels="eager"))
    inner = obj._loss_impl

    def spy(*args, **kwargs):
        seen["loss_rows"] = args[5]
        return inner(*args, **kwargs)

    obj._loss_impl = spy
    net = DualTimeMLP(width=16, depth=1)
    out = obj.training_step(net, torch.randn(9, 2), None, None, OnlineTeacher(net))
    masks = out.split.masks()
    assert torch.equal(seen["loss_rows"], masks["mul"] | masks["adv"]) and masks["e2e"].any()


class Linear(torch.nn.Module):
    """F(x, t, tt) = x: the RCGM integral then has a closed form."""

    def forward(self, x, t, tt, cond):
        return x.clone()


def test_rcgm_integral_against_hand_computation():
    cfg = TwinFlowConfig(preset="rcgm_theory", enhanced_ratio=0.0, estimate_order=2, kernels="eager")
    obj = TwinFlowObjective(cfg)
    x_t = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    target = torch.tensor([[0.3, 0.1], [-0.2, 0.4]])
    from twinflow.method.times import StepTimes

    times = StepTimes(t=torch.tensor([0.8, 0.3]), tt=torch.tensor([0.2, 0.295]))
    acc = obj._rcgm_integral(Linear(), x_t, target, times, None, torch.tensor([True, True]), torch.float32)
    for r in range(2):
        t, tt = times.t[r].item(), times.tt[r].item()
        t_m = max(t - 0.01, tt)
        s = [t_m, (t_m + tt) / 2, tt]
        x = x_t[r] - 0.01 * target[r]
        expected = torch.zeros(2)
        for i in range(2):
            F = x
            expected += F * (s[i] - s[i + 1])
            x = x + F * (s[i + 1] - s[i])  # inversion then re-noising at s_{i+1} is an Euler step
        torch.testing.assert_close(acc[r], expected)


def test_guided_rows_follow_the_open_range_and_skip_adv_and_e2e():
    torch.manual_seed(1)
    out, online, teacher, cfg = run("twinflow", enhanced_range=(0.3, 0.7), ema_decay_rate=0.5)
    t = online.calls[1]["t"]  # the main pass
    adv = out.split.masks()["adv"]
    expected = int(((t > 0.3) & (t < 0.7) & ~adv).sum())
    assert out.forward_rows.get("guidance", 0) == 2 * expected
    e2e = out.split.masks()["e2e"]
    assert torch.all(t[e2e] == 1)  # e2e rows sit at t = 1, outside any range with r1 <= 1


def test_preset_table_values():
    table = {
        "twinflow": ((1, 1, 1, 1, 0), {}),
        "rcgm_theory": ((0, 0, 1, 0, 0), {}),
        "rcgm_practice": ((1, 1, 1, 0, 0), {"dist_match_cof": 0.0}),
        "flow_matching": ((0, 1, 0, 0, 0), {"consistc_ratio": 0.0, "enhanced_ratio": 0.0, "estimate_order": 0}),
        "lora_1order": ((1, 1, 0, 1, 1), {"estimate_order": 1}),
    }
    for name, (probs, keys) in table.items():
        cfg = TwinFlowConfig.from_preset(name)
        assert tuple(cfg.probs.as_dict().values()) == probs, name
        defaults = {"consistc_ratio": 1.0, "enhanced_ratio": 0.5, "estimate_order": 2, "dist_match_cof": 0.5,
                    "ema_decay_rate": 0.99, "enhanced_range": (0.0, 1.0), "time_dist_ctrl": (1.0, 1.0, 1.0)}
        for key, value in {**defaults, **keys}.items():
            assert getattr(cfg, key) == value, (name, key)


class CountingTeacher(Teacher):
    """Counts sessions: under ZeRO-3 a session swaps shards and releases every gathered parameter."""

    def __init__(self, model):
        super().__init__(model)
        self.sessions = 0

    def session(self):
        self.sessions += 1
        return super().session()


@pytest.mark.parametrize(
    "preset, overrides, sessions",
    [
        ("flow_matching", {}, 0),
        ("rcgm_theory", {"enhanced_ratio": 0.0, "ema_decay_rate": 1.0}, 0),  # RCGM on the online model
        ("rcgm_theory", {"enhanced_ratio": 0.0}, 1),
        ("flow_matching", {"enhanced_ratio": 0.5}, 1),  # guidance alone needs the teacher
        ("twinflow", {}, 1),
    ],
)
def test_teacher_session_is_entered_only_when_a_teacher_pass_runs(preset, overrides, sessions):
    torch.manual_seed(0)
    net = DualTimeMLP(num_classes=3, width=32, depth=1)
    teacher = CountingTeacher(copy.deepcopy(net))
    obj = TwinFlowObjective(TwinFlowConfig(preset=preset, kernels="eager", **overrides))
    x, c, u = torch.randn(B, 2), torch.randint(0, 3, (B,)), torch.full((B,), 3)
    out = obj.training_step(net, x, c, u, teacher)
    assert torch.isfinite(out.loss)
    assert teacher.sessions == sessions
