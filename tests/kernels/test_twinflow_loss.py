"""Fused TwinFlow loss kernel (kernels/twinflow_loss.py) against the eager specification.

Every check compares ``twinflow_loss(..., backend="triton")`` (loss_math.py, which runs the kernel's
``twinflow_loss_triton``) with ``twinflow_loss_reference`` (loss_math.py)
differentiated by torch autograd: both loss values, and dL/dF of ``G_BASE * base + G_RECT * rect`` (two
different upstream weights, so both gradient terms and their scaling are checked). The kernel runs with
poisoned allocations, so an output or gradient element it fails to write is NaN and fails the check.

Tolerances (ALGORITHM.md §5): losses are float32 results from the same input values, so 1e-5 relative
in every dtype; gradients are 1e-5 relative in float32 and are rounded to F's dtype otherwise (bf16:
1e-2, fp16: 1e-3, one to two units in the last place). An element's error is measured against the
larger of its own magnitude and the tensor's largest magnitude times the same factor: differences like
``F - y`` round at the scale of the tensor's values, not at the scale of a result that happens to be 0.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Optional

import pytest
import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.kernels import twinflow_loss as loss_mod
from twinflow.method.config import LossFuncConfig, TwinFlowConfig
from twinflow.method.loss_math import LossArithmetic, twinflow_loss, twinflow_loss_reference
from twinflow.method.objective import TwinFlowObjective
from twinflow.method.teachers.build import build_teacher

G_BASE, G_RECT = 0.7, 1.3
GRAD_REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOSS_REL = 1e-5
LOSSES = {
    "l2": LossFuncConfig("l2"),
    "barron": LossFuncConfig("barron_reweighting", 1.0, 1e-3),
    "barron_alpha2": LossFuncConfig("barron_reweighting", 2.0, 1e-3),
}


def arith(loss: str = "barron", replace_mode: bool = False, guide_range=(0.1, 0.9), dmc: float = 0.5) -> LossArithmetic:
    return LossArithmetic(enhanced_ratio=0.5, enhanced_range=guide_range, guide_replace=replace_mode,
                          rcgm_delta=0.01, loss=LOSSES[loss], dist_match_cof=dmc)


@dataclass
class Case:
    """Inputs of one loss call. ``F`` is a leaf; ``make_F`` turns it into the tensor passed as F."""

    F: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    tt: torch.Tensor
    adv: torch.Tensor
    loss_rows: torch.Tensor
    v_c: Optional[torch.Tensor] = None
    v_u: Optional[torch.Tensor] = None
    rcgm_acc: Optional[torch.Tensor] = None
    rect_diff: Optional[torch.Tensor] = None
    make_F: Callable[[torch.Tensor], torch.Tensor] = lambda leaf: leaf


def make_case(B: int, shape: tuple[int, ...], device, *, dtype=torch.float32, guide: bool = True,
              rcgm: bool = True, n_rect: Optional[int] = None, n_adv: int = 1, n_equal: int = 1,
              loss_rows: str = "all", seed: int = 0) -> Case:
    """Rows in batch order: ``n_rect`` e2e rows (t = 1, tt = 0), then rows with t in (0, 1) and tt <= t
    (the first ``n_equal`` of them with tt == t), the last ``n_adv`` rows adv with (t, tt) = (-s, -s).
    ``rcgm_acc`` is built so that the finite difference ``d`` is of order 1: some elements inside the
    clamp, some clamped."""
    g = torch.Generator().manual_seed(seed)
    n_rect = min(2, B) if n_rect is None else n_rect

    def randn(*s):
        return torch.randn(*s, generator=g)

    F = randn(B, *shape)
    target = randn(B, *shape)
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    tt = t * torch.rand(B, generator=g)
    tt[n_rect:n_rect + n_equal] = t[n_rect:n_rect + n_equal]
    t[:n_rect], tt[:n_rect] = 1.0, 0.0
    adv = torch.zeros(B, dtype=torch.bool)
    if n_adv:
        adv[B - n_adv:] = True
        t[adv] = -t[adv]
        tt[adv] = t[adv]
    rows = {"all": torch.ones(B, dtype=torch.bool), "none": torch.zeros(B, dtype=torch.bool),
            "some": torch.arange(B) % 2 == 1}[loss_rows]
    gap = (t - tt).reshape(-1, *([1] * len(shape)))
    acc = F * gap - 0.01 * (target + 1.5 * randn(B, *shape)) if rcgm else None
    v_c, v_u = (randn(B, *shape), randn(B, *shape)) if guide else (None, None)
    rect_diff = randn(n_rect, *shape) * 0.8 if n_rect else None

    def put(x):
        return None if x is None else x.to(device=device, dtype=dtype)

    return Case(put(F).requires_grad_(True), put(target), t.to(device), tt.to(device), adv.to(device),
                rows.to(device), put(v_c), put(v_u), put(acc), put(rect_diff))


def losses_and_grad(fn, case: Case, ar: LossArithmetic, **kwargs):
    """``(base, rect, dL/dF)`` of ``G_BASE * base + G_RECT * rect`` computed by ``fn``."""
    case.F.grad = None
    base, rect = fn(case.make_F(case.F), case.target, case.t, case.tt, case.adv, case.loss_rows, ar,
                    v_c=case.v_c, v_u=case.v_u, rcgm_acc=case.rcgm_acc, rect_diff=case.rect_diff, **kwargs)
    (G_BASE * base + G_RECT * rect).backward()
    return base.detach(), rect.detach(), case.F.grad.clone()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Elementwise ``|a - e| <= rel * |e| + rel * max|e|`` (see the module docstring)."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def check(case: Case, ar: LossArithmetic, poisoned_allocations) -> tuple[torch.Tensor, ...]:
    """Runs kernel (poisoned) and reference; asserts equal losses and gradients. Returns the kernel's."""
    with poisoned_allocations() as record:
        kernel = losses_and_grad(twinflow_loss, case, ar, backend="triton")
    assert record.count > 0, "the poisoning did not reach the kernel's allocations"
    ref = losses_and_grad(twinflow_loss_reference, case, ar)
    assert kernel[0].dtype == torch.float32 and kernel[1].dtype == torch.float32
    assert_rel_close(kernel[0], ref[0], LOSS_REL, "base loss")
    assert_rel_close(kernel[1], ref[1], LOSS_REL, "rectification loss")
    assert kernel[2].dtype == case.F.dtype and kernel[2].shape == case.F.shape
    assert_rel_close(kernel[2], ref[2], GRAD_REL[case.F.dtype], "dL/dF")
    return kernel


@pytest.mark.parametrize(
    "B, shape",
    [(1, (5,)), (3, (33,)), (7, (100,)), (16, (1,)), (64, (5,)), (3, (4, 17, 19)), (2, (2500,))],
)
def test_matches_reference_across_shapes(device, poisoned_allocations, B, shape):
    check(make_case(B, shape, device), arith(), poisoned_allocations)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("rect", ["none", "empty", "one_row", "all_rows"])
@pytest.mark.parametrize("rcgm", [False, True])
@pytest.mark.parametrize("guide", ["off", "add", "replace"])
def test_every_optional_input(device, poisoned_allocations, guide, rcgm, rect, loss):
    B = 5
    n_rect = {"none": 0, "empty": 0, "one_row": 1, "all_rows": B}[rect]
    case = make_case(B, (7,), device, guide=guide != "off", rcgm=rcgm, n_rect=n_rect, n_adv=1)
    if rect == "empty":
        case.rect_diff = case.target[:0]
    _, rect_loss, _ = check(case, arith(loss, replace_mode=guide == "replace"), poisoned_allocations)
    assert (rect_loss.item() == 0.0) == (n_rect == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(device, poisoned_allocations, dtype):
    check(make_case(7, (3, 11), device, dtype=dtype), arith(), poisoned_allocations)


@pytest.mark.parametrize(
    "case_kwargs, arith_kwargs",
    [
        ({"n_adv": 0}, {}),
        ({"n_adv": 6, "n_rect": 0, "n_equal": 0}, {}),
        ({"n_adv": 2, "n_rect": 2, "n_equal": 0}, {"guide_range": (-2.0, 2.0)}),  # every non-adv row guided
        ({}, {"guide_range": (2.0, 3.0)}),  # no row guided
        ({"n_rect": 6, "n_adv": 0}, {}),  # every row e2e
        ({"loss_rows": "some"}, {}),
        ({"loss_rows": "none"}, {}),
        ({"n_rect": 0, "n_adv": 0, "n_equal": 6}, {}),  # t == tt everywhere
    ],
    ids=["no_adv", "all_adv", "all_guided", "none_guided", "all_e2e", "some_loss_rows", "no_loss_rows",
         "all_t_eq_tt"],
)
def test_group_masks_empty_and_full(device, poisoned_allocations, case_kwargs, arith_kwargs):
    check(make_case(6, (9,), device, **case_kwargs), arith(**arith_kwargs), poisoned_allocations)


def test_no_loss_rows_gives_exact_zero_loss_and_gradient(device, poisoned_allocations):
    case = make_case(4, (6,), device, loss_rows="none", n_rect=0)
    base, rect, grad = check(case, arith(), poisoned_allocations)
    assert base.item() == 0.0 and rect.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("time", [0.0, 0.005, 0.5, 1.0])
def test_t_equal_tt_never_nan(device, poisoned_allocations, time):
    """The short RCGM branch must not divide by ``t - tt``; zero and sub-delta gaps included."""
    case = make_case(4, (5,), device, n_rect=0, n_adv=0)
    case.t = torch.full((4,), time, device=device)
    case.tt = case.t.clone()
    case.tt[1] = max(time - 0.004, 0.0)  # a gap below delta that is not exactly zero
    check(case, arith(guide_range=(-1.0, 2.0)), poisoned_allocations)


def test_guidance_range_and_rcgm_branch_boundaries(device, poisoned_allocations):
    """Guidance needs r0 < t < r1 (open interval); the long RCGM branch starts at t - tt == delta.

    Rows: t on r0, inside, on r1; then gaps of exactly delta (fp32: 0.01 - 0), just below and just above.
    """
    case = make_case(6, (7,), device, n_rect=0, n_adv=0)
    delta32 = torch.tensor(0.01).item()
    case.t = torch.tensor([0.25, 0.5, 0.75, delta32, 0.3, 0.3], device=device)
    case.tt = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.3 - 0.0099, 0.3 - 0.0101], device=device)
    # d = (F gap - acc - delta y) / delta = (target - y) - 0.5 noise: mostly inside the clamp, so the
    # guidance and the branch taken both show in the result.
    noise = torch.randn(case.F.shape, generator=torch.Generator().manual_seed(5)).to(device)
    gap = (case.t - case.tt)[:, None]
    case.rcgm_acc = case.F.detach() * gap - 0.01 * case.target + 0.005 * noise
    check(case, arith(guide_range=(0.25, 0.75)), poisoned_allocations)


def test_unread_rows_never_leak_nan_or_inf(device, poisoned_allocations):
    """Guidance is read on guided rows only and the RCGM integral on non-adv rows only."""
    case = make_case(6, (8,), device, n_adv=2, n_rect=1)
    ar = arith(guide_range=(0.1, 0.9))
    guided = (case.t > 0.1) & (case.t < 0.9) & ~case.adv
    assert guided.any() and (~guided).any()
    case.v_c[~guided] = float("nan")
    case.v_u[~guided] = float("inf")
    case.rcgm_acc[case.adv] = float("nan")
    check(case, ar, poisoned_allocations)


def _channels_last(leaf):
    return leaf.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "leaf_shape, make_F",
    [
        ((3, 4, 5, 7), _channels_last),
        ((5, 40), lambda leaf: leaf[:, 3:36]),  # row-strided: read in place
        ((9, 4), lambda leaf: leaf.t()),  # transposed: copied
        ((6, 3, 10), lambda leaf: leaf[::2, :, 1:8]),  # strided rows and columns
    ],
    ids=["channels_last", "row_slice", "transposed", "strided_rows_and_columns"],
)
def test_non_contiguous_F(device, poisoned_allocations, leaf_shape, make_F):
    leaf = torch.randn(leaf_shape, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_(True)
    F = make_F(leaf)
    assert not F.is_contiguous()
    case = make_case(F.shape[0], tuple(F.shape[1:]), device)
    case = replace(case, F=leaf, make_F=make_F)
    check(case, arith(), poisoned_allocations)


def test_multi_block_reduction(device, poisoned_allocations, monkeypatch):
    """Several column blocks per row, and an epilogue that needs several steps over the partial sums."""
    monkeypatch.setattr(loss_mod, "_MAX_BLOCK", 16)
    monkeypatch.setattr(loss_mod, "_EPILOGUE_TILE", 32)
    check(make_case(3, (100,), device), arith(), poisoned_allocations)


def test_forward_without_grad_matches_reference(device):
    case = make_case(5, (13,), device)
    F = case.F.detach()
    args = (F, case.target, case.t, case.tt, case.adv, case.loss_rows, arith())
    kwargs = dict(v_c=case.v_c, v_u=case.v_u, rcgm_acc=case.rcgm_acc, rect_diff=case.rect_diff)
    with torch.no_grad():
        got = twinflow_loss(*args, backend="triton", **kwargs)
    expected = twinflow_loss_reference(*args, **kwargs)
    for g, e, what in zip(got, expected, ("base", "rect")):
        assert not g.requires_grad
        assert_rel_close(g, e, LOSS_REL, what)


def test_eager_backend_is_the_reference():
    case = make_case(4, (6,), "cpu")
    args = (case.F, case.target, case.t, case.tt, case.adv, case.loss_rows, arith())
    kwargs = dict(v_c=case.v_c, v_u=case.v_u, rcgm_acc=case.rcgm_acc, rect_diff=case.rect_diff)
    for got, expected in zip(twinflow_loss(*args, backend="eager", **kwargs), twinflow_loss_reference(*args, **kwargs)):
        assert torch.equal(got, expected)


def test_rejects_malformed_inputs():
    case = make_case(4, (6,), "cpu")
    ar = arith()
    base = (case.F, case.target, case.t, case.tt, case.adv, case.loss_rows, ar)
    with pytest.raises(ValueError, match="target"):
        twinflow_loss(case.F, case.target[:, :5], *base[2:], backend="triton")
    with pytest.raises(ValueError, match="v_u"):
        twinflow_loss(*base, v_c=case.v_c, backend="triton")
    with pytest.raises(ValueError, match="rect_diff"):
        twinflow_loss(*base, rect_diff=torch.zeros(5, 6), backend="triton")
    with pytest.raises(TypeError, match="adv"):
        twinflow_loss(case.F, case.target, case.t, case.tt, case.adv.float(), case.loss_rows, ar, backend="triton")


@pytest.mark.parametrize(
    "overrides",
    [
        {"preset": "twinflow"},
        {"preset": "flow_matching", "loss_func": LossFuncConfig("l2")},
        {"preset": "twinflow", "ema_decay_rate": 1.0, "use_image_free": True,
         "loss_func": LossFuncConfig("barron_reweighting", 2.0, 1e-2)},
    ],
    ids=["twinflow", "flow_matching_l2", "guide_replace"],
)
def test_objective_triton_matches_eager(device, overrides):
    """A whole training step on the MLP backbone: same loss, same parameter gradients."""
    torch.manual_seed(0)
    net = DualTimeMLP(num_classes=3, width=32, depth=1).to(device)
    B = 16
    x = torch.randn(B, 2, device=device)
    cond = torch.randint(0, 3, (B,), device=device)
    uncond = torch.full((B,), 3, device=device)
    results = {}
    for kernels in ("eager", "triton"):
        model = copy.deepcopy(net)
        cfg = TwinFlowConfig(kernels=kernels, **overrides)
        teacher = build_teacher(model, cfg.ema_decay_rate, backend="eager")
        torch.manual_seed(1)
        out = TwinFlowObjective(cfg).training_step(model, x, cond, uncond, teacher)
        out.loss.backward()
        results[kernels] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (eager, eager_grads), (fused, fused_grads) = results["eager"], results["triton"]
    assert_rel_close(fused.loss, eager.loss, LOSS_REL, "loss")
    assert_rel_close(fused.rect_loss, eager.rect_loss, LOSS_REL, "rect loss")
    assert eager_grads.keys() == fused_grads.keys() and eager_grads
    for name, g in eager_grads.items():
        assert_rel_close(fused_grads[name], g, 1e-5, f"grad of {name}")
