"""The loss arithmetic (§3.6–3.10) against hand-computed values."""
import math

import pytest
import torch

from twinflow.method.config import LossFuncConfig
from twinflow.method.ema_schedule import EMADecaySchedule
from twinflow.method.loss_math import (
    LossArithmetic,
    final_target,
    guided_target,
    rcgm_target,
    time_weight,
    twinflow_loss_reference,
)
from twinflow.method.losses import per_sample_loss


def arith(**kw):
    base = dict(enhanced_ratio=0.5, enhanced_range=(0.0, 1.0), guide_replace=False, rcgm_delta=0.01,
                loss=LossFuncConfig(), dist_match_cof=0.5)
    base.update(kw)
    return LossArithmetic(**base)


def test_barron_against_hand_computed_values():
    p = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 0.1]])
    m = torch.tensor([(1 + 4) / 2, 0.01 / 2])
    c = 1e-3
    r = m / (c * c + 1e-8)
    w = (r / 1.0 + 1.0) ** (-0.5)  # alpha = 1: |alpha - 2| = 1, exponent -1/2
    expected = m * w / c
    got = per_sample_loss(p, y, LossFuncConfig("barron_reweighting", 1.0, c))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # a number computed on paper: m = 2.5, r = 2.5 / 1.01e-6, loss = 2.5 / sqrt(r + 1) / 1e-3
    assert got[0].item() == pytest.approx(2.5 / math.sqrt(2.5 / 1.01e-6 + 1) / 1e-3, rel=1e-6)
    # alpha = 2 is plain scaled MSE
    torch.testing.assert_close(per_sample_loss(p, y, LossFuncConfig("barron_reweighting", 2.0, c)), m / c)
    torch.testing.assert_close(per_sample_loss(p, y, LossFuncConfig("l2")), m)


def test_barron_weight_is_detached():
    p = torch.tensor([[3.0]], requires_grad=True)
    per_sample_loss(p, torch.zeros(1, 1), LossFuncConfig("barron_reweighting", 1.0, 1.0)).sum().backward()
    m = 9.0
    w = (m / (1 + 1e-8) + 1) ** -0.5
    assert p.grad.item() == pytest.approx(2 * 3.0 * w, rel=1e-6)


def test_rcgm_long_branch():
    F = torch.tensor([[0.3, -0.2]])
    target = torch.tensor([[0.1, 0.1]])
    acc = torch.tensor([[0.0895, -0.0605]])
    t, tt = torch.tensor([0.8]), torch.tensor([0.5])
    d = (F * 0.3 - acc - 0.01 * target) / 0.01
    expected = F - d.clamp(-1, 1)
    assert (d.abs() < 1).all()  # inside the clamp: the finite-difference value itself
    torch.testing.assert_close(rcgm_target(F, target, acc, t, tt, 0.01), expected)


def test_rcgm_clamp_is_active():
    F = torch.tensor([[1.0, -1.0, 0.0]])
    target = torch.zeros(1, 3)
    acc = torch.zeros(1, 3)
    t, tt = torch.tensor([0.5]), torch.tensor([0.0])
    # d = F * 0.5 / 0.01 = [50, -50, 0] -> clamped to [1, -1, 0]
    out = rcgm_target(F, target, acc, t, tt, 0.01)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0]]))


def test_rcgm_short_branch_and_t_equals_tt_never_nan():
    F = torch.tensor([[0.7, -0.1], [0.2, 0.2]])
    target = torch.tensor([[0.5, 0.0], [0.0, 0.1]])
    acc = torch.zeros(2, 2)
    t = torch.tensor([0.3, 0.4])
    tt = torch.tensor([0.3, 0.395])  # equal, and closer than delta
    out = rcgm_target(F, target, acc, t, tt, 0.01)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F - (F - target).clamp(-1, 1))
    # with the short branch unclamped the target is exactly the base target
    torch.testing.assert_close(out, target)


def test_time_weight_values():
    t = torch.tensor([1.0, 0.5, 0.5, -0.3])
    tt = torch.tensor([0.0, 0.5, 0.2, -0.3])
    adv = torch.tensor([False, False, False, True])
    w = time_weight(t, tt, adv)
    expected = [math.tan(0.0) + 1, math.tan(math.pi / 2.5) + 1, math.tan(0.7 * math.pi / 2.5) + 1, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected))


def test_guided_target_rows_and_replace_mode():
    target = torch.ones(4, 3)
    v_c = torch.full((4, 3), 3.0)
    v_u = torch.full((4, 3), 1.0)
    rows = torch.tensor([True, False, True, False])
    out = guided_target(target, v_c, v_u, rows, arith())
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0, 1.0, 2.0, 1.0]))
    rep2 = guided_target(target * 10, v_c, v_u, rows, arith(guide_replace=True))
    torch.testing.assert_close(rep2[:, 0], torch.tensor([2.0, 10.0, 2.0, 10.0]))


def test_final_target_adv_rows_keep_guided_target_and_gradient_reaches_F_only_as_prediction():
    torch.manual_seed(0)
    B = 4
    F = torch.randn(B, 5, requires_grad=True)
    target = torch.randn(B, 5)
    acc = torch.randn(B, 5) * 0.01
    t = torch.tensor([1.0, 0.6, 0.7, -0.4])
    tt = torch.tensor([0.0, 0.58, 0.2, -0.4])
    adv = torch.tensor([False, False, False, True])
    y = final_target(F, target, t, tt, adv, arith(enhanced_ratio=0.0), rcgm_acc=acc)
    assert not y.requires_grad
    torch.testing.assert_close(y[3], target[3])
    torch.testing.assert_close(y[:3], rcgm_target(F[:3], target[:3], acc[:3], t[:3], tt[:3], 0.01))
    a = arith(enhanced_ratio=0.0, loss=LossFuncConfig("l2"))
    loss_rows = torch.ones(B, dtype=torch.bool)
    base, rect = twinflow_loss_reference(F, target, t, tt, adv, loss_rows, a, rcgm_acc=acc)
    base.backward()
    w = time_weight(t, tt, adv)
    expected_grad = 2 * (F.detach() - y) / 5 * w[:, None] / B
    torch.testing.assert_close(F.grad, expected_grad)


def test_base_loss_mean_over_selected_rows_and_zero_when_none():
    F = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3)
    t = torch.tensor([0.5, 0.5, 0.5, 0.5])
    tt = t.clone()
    adv = torch.zeros(4, dtype=torch.bool)
    a = arith(loss=LossFuncConfig("l2"))
    rows = torch.tensor([False, True, True, False])
    base, _ = twinflow_loss_reference(F, target, t, tt, adv, rows, a)
    w = math.tan(math.pi / 2.5) + 1
    expected = ((F.detach() - target) ** 2).mean(1)[1:3].mean() * w
    torch.testing.assert_close(base, expected)
    zero, _ = twinflow_loss_reference(F, target, t, tt, adv, torch.zeros(4, dtype=torch.bool), a)
    assert zero.item() == 0.0 and zero.requires_grad


def test_rectification_loss_value_and_gradient():
    F = torch.randn(6, 4, requires_grad=True)
    diff = torch.tensor([[2.0, -0.5, 0.1, -3.0], [0.2, 0.2, 0.2, 0.2]])
    a = arith(loss=LossFuncConfig("l2"), dist_match_cof=0.5)
    zeros = torch.zeros(6)
    _, rect = twinflow_loss_reference(F, F.detach(), zeros + 0.5, zeros + 0.5, zeros.bool(), zeros.bool(), a, rect_diff=diff)
    dv = diff.clamp(-1, 1)
    torch.testing.assert_close(rect, (dv ** 2).mean(1).mean() * 0.5)
    rect.backward()
    expected = torch.zeros(6, 4)
    expected[:2] = 2 * dv / 4 / 2 * 0.5
    torch.testing.assert_close(F.grad, expected)


def test_ema_decay_sequence():
    s = EMADecaySchedule(0.99)
    got = [s.next_decay() for _ in range(4)]
    d, expected = 0.0, []
    for _ in range(4):
        expected.append(d)
        d = d + (1 - d) * (0.99 - d) / 2
    assert got == pytest.approx(expected, abs=0)
    assert got[:3] == pytest.approx([0.0, 0.495, 0.495 + 0.505 * 0.2475], rel=1e-12)
    state = s.state_dict()
    s2 = EMADecaySchedule(0.99)
    s2.load_state_dict(state)
    assert s2.next_decay() == s.next_decay()
    with pytest.raises(ValueError, match="targets 0.99"):
        EMADecaySchedule(0.9).load_state_dict(state)
