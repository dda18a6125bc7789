"""Multi-tensor EMA kernel (kernels/ema.py, kernels/ema_triton.py) against its eager reference and float64 truth.

The kernel and the reference evaluate the same float32 formula with the same roundings, so they are
compared bit for bit; float64 truth bounds the error of that formula itself. The ``device`` fixture
(tests/kernels/conftest.py) runs each test through Triton's interpreter on CPU and on CUDA when present.
"""
from __future__ import annotations

import math

import pytest
import torch

from twinflow.kernels import ema as ema_mod
from twinflow.kernels import ema_triton
from twinflow.kernels._common import KernelBackendError
from twinflow.kernels.ema import MultiTensorEMA, ema_update_, ema_update_reference_
from twinflow.method.ema_schedule import EMADecaySchedule

SRC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHADOW_DTYPES = [None, torch.bfloat16, torch.float16, torch.float32]
# Decays reaching every kernel mode: copy (0), src + (1-w)(ema-src) (w >= 0.5), ema + w(src-ema), keep.
DECAYS = [0.0, 0.3, 0.5, 0.8, 1.0]
U32 = 2.0**-24  # float32 unit roundoff
def dtype_id(dtype) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def mixed_shapes(seed: int = 0) -> list[tuple[int, ...]]:
    """Sizes 1, odd and non-power-of-two, many small tensors, and a few spanning several blocks."""
    g = torch.Generator().manual_seed(seed)
    small = [(int(n),) for n in torch.randint(1, 40, (20,), generator=g)]
    return [(1,), (7,), (3, 5), (1, 1), (2, 3, 4), (33, 31), (1000,), (2 * ema_triton.BLOCK + 3,)] + small


def randn(shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.view(_BITS[actual.dtype]), expected.view(_BITS[expected.dtype])
    differ = (a != e).sum().item()
    assert differ == 0, f"{what}: {differ} of {a.numel()} elements differ bitwise"


@pytest.fixture
def launches(monkeypatch):
    """Records every kernel launch (one entry per call of the launcher)."""
    calls = []
    real = ema_triton.launch

    def counting(group, mode, coef):
        calls.append(group.table.shape[0])
        real(group, mode, coef)

    monkeypatch.setattr(ema_triton, "launch", counting)
    return calls


@pytest.mark.parametrize("shadow_dtype", SHADOW_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES, ids=dtype_id)
def test_kernel_matches_reference_and_float64_truth(device, src_dtype, shadow_dtype, launches):
    shapes = mixed_shapes()
    ema = [randn(s, device=device, seed=i) for i, s in enumerate(shapes)]
    ref = [e.clone() for e in ema]
    shadow = [torch.full(s, float("nan"), dtype=shadow_dtype, device=device) for s in shapes] if shadow_dtype else None
    ref_shadow = [t.clone() for t in shadow] if shadow else None
    for step, decay in enumerate(DECAYS):
        src = [randn(s, src_dtype, device, seed=1000 * (step + 1) + i) for i, s in enumerate(shapes)]
        truth = [decay * e.double() + (1 - decay) * s.double() for e, s in zip(ref, src)]
        scale = [e.double().abs() + s.double().abs() for e, s in zip(ref, src)]
        ema_update_(ema, src, decay, shadow=shadow, backend="triton")
        ema_update_reference_(ref, src, decay, ref_shadow)
        for i in range(len(shapes)):
            assert_bitwise_equal(ema[i], ref[i], f"ema[{i}] at decay {decay}")
            err = (ema[i].double() - truth[i]).abs()
            assert (err <= 4 * U32 * scale[i]).all(), f"ema[{i}] at decay {decay}: max err {err.max():.3g}"
            if shadow is not None:
                assert_bitwise_equal(shadow[i], ref_shadow[i], f"shadow[{i}] at decay {decay}")
                rel = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[shadow_dtype]
                bound = rel * truth[i].abs() + 8 * U32 * scale[i] + 2.0**-24
                assert ((shadow[i].double() - truth[i]).abs() <= bound).all(), f"shadow[{i}] at decay {decay}"
    assert launches == [launches[0]] * len(DECAYS), "one launch per update for a single dtype group"


def test_two_hundred_tensors_take_one_launch(device, launches):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 600, (200,), generator=g)]
    ema = [randn(s, device=device, seed=i) for i, s in enumerate(shapes)]
    src = [randn(s, torch.bfloat16, device, seed=500 + i) for i, s in enumerate(shapes)]
    shadow = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes]
    ref, ref_shadow = [e.clone() for e in ema], [t.clone() for t in shadow]
    ema_update_(ema, src, 0.4, shadow=shadow, backend="triton")
    ema_update_reference_(ref, src, 0.4, ref_shadow)
    assert len(launches) == 1
    for i in range(len(shapes)):
        assert_bitwise_equal(ema[i], ref[i], f"ema[{i}]")
        assert_bitwise_equal(shadow[i], ref_shadow[i], f"shadow[{i}]")


@pytest.mark.parametrize("count", [1, 6, 60])
def test_launch_count_depends_on_dtype_groups_not_tensor_count(device, count, launches):
    dtypes = [SRC_DTYPES[i % 3] for i in range(count)]
    ema = [randn((5 + i,), device=device, seed=i) for i in range(count)]
    src = [randn((5 + i,), dt, device, seed=99 + i) for i, dt in enumerate(dtypes)]
    ema_update_(ema, src, 0.7, backend="triton")
    assert len(launches) == len(set(dtypes))


@pytest.mark.parametrize("chunk", [48, 50, ema_triton.CHUNK])
def test_flat_partition_spanning_many_chunks(device, chunk, launches):
    """A ZeRO-3 shard: one flat fp32 EMA beside one flat bf16 partition, split over several rows."""
    n = 2 * ema_triton.CHUNK + 3 * ema_triton.BLOCK + 5 if chunk == ema_triton.CHUNK else 1001
    ema, src = randn((n,), device=device, seed=1), randn((n,), torch.bfloat16, device, seed=2)
    ref = ema.clone()
    ema_mod._ema_update_triton([ema], [src], None, 0.6, chunk=chunk)
    ema_update_reference_([ref], [src], 0.6)
    assert launches == [math.ceil(n / chunk)]
    assert_bitwise_equal(ema, ref, "flat shard")


@pytest.mark.parametrize("aligned", [True, False])
def test_views_leave_guard_regions_untouched(device, aligned):
    """EMA, source and shadow are views into larger buffers; the guards between them keep their poison.

    Offsets that are multiples of 16 elements take the kernel's vectorised (aligned) path, odd offsets
    the scalar one; the test checks which path the host chose."""
    shapes = [(1,), (17,), (4, 9), (2 * ema_triton.BLOCK + 1,)]
    guard, align = (16, 16) if aligned else (3, 1)
    offsets, total = [], guard
    for s in shapes:
        offsets.append(total)
        total += -(-math.prod(s) // align) * align + guard
    ema_buf = torch.full((total,), -1234.5, device=device)
    shadow_buf = torch.full((total,), float("nan"), dtype=torch.bfloat16, device=device)
    src_buf = randn((total,), torch.float16, device, seed=5)
    views = lambda buf: [buf[o:o + math.prod(s)].view(s) for o, s in zip(offsets, shapes)]  # noqa: E731
    ema, shadow, src = views(ema_buf), views(shadow_buf), views(src_buf)
    for i, e in enumerate(ema):
        e.copy_(randn(e.shape, device=device, seed=40 + i))
    expected_ema, expected_shadow = ema_buf.clone(), shadow_buf.clone()
    ema_update_reference_(views(expected_ema), src, 0.25, views(expected_shadow))

    groups = ema_triton.build_groups(ema, src, shadow, None, ema_triton.CHUNK)
    assert [g.aligned for g in groups] == [aligned]
    ema_update_(ema, src, 0.25, shadow=shadow, backend="triton")
    assert_bitwise_equal(ema_buf, expected_ema, "ema buffer with guards")
    assert_bitwise_equal(shadow_buf, expected_shadow, "shadow buffer with guards")


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, subnormals, extremes and randoms, representable in ``dtype``."""
    info = torch.finfo(dtype)
    fixed = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -3.5])
    return torch.cat([fixed, torch.randn(37, generator=torch.Generator().manual_seed(8))]).to(dtype)


@pytest.mark.parametrize("src_dtype", SRC_DTYPES, ids=dtype_id)
def test_first_update_copies_the_source_exactly(device, src_dtype):
    """d = 0: the EMA (even NaN-poisoned, as from torch.empty) becomes the source, bit for bit."""
    src = [special_values(src_dtype).to(device), randn((3, 7), src_dtype, device, seed=9)]
    ema = [torch.full(s.shape, float("nan"), device=device) for s in src]
    shadow = [torch.full(s.shape, float("nan"), dtype=src_dtype, device=device) for s in src]
    averager = MultiTensorEMA(ema, shadow_tensors=shadow, backend="triton")
    averager.update(src, decay=EMADecaySchedule(0.99).next_decay())
    for i, s in enumerate(src):
        assert_bitwise_equal(ema[i], s.float(), f"ema[{i}]")
        assert_bitwise_equal(shadow[i], s, f"shadow[{i}]")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_schedule_sequence_matches_hand_computation(device, backend):
    """The decays of the teacher's schedule, applied step by step, against float64 truth."""
    # d_{k+1} = d_k + (1 - d_k)(0.9 - d_k)/2 from d_0 = 0, worked by hand.
    expected_decays = [0.0, 0.45, 0.57375, 0.64328203125]
    ema = [torch.zeros(5, device=device), torch.zeros(2, 3, device=device)]
    averager, schedule = MultiTensorEMA(ema, backend=backend), EMADecaySchedule(0.9)
    truth = [e.double() for e in ema]
    for step, expected in enumerate(expected_decays):
        src = [randn(e.shape, torch.bfloat16, device, seed=10 * step + i) for i, e in enumerate(ema)]
        decay = schedule.next_decay()
        assert decay == pytest.approx(expected, rel=1e-15, abs=0)
        averager.update(src, decay=decay)
        truth = [expected * t + (1 - expected) * s.double() for t, s in zip(truth, src)]
        for e, t in zip(ema, truth):
            torch.testing.assert_close(e.double(), t, rtol=1e-6, atol=1e-7)


def test_agrees_with_torch_foreach_lerp(device):
    """Same weight as torch._foreach_lerp_(ema, src, 1 - d); torch may fuse to FMA, so allow 1 ulp,
    and demand exactness at the ends (d = 0 and d = 1)."""
    shapes = mixed_shapes(seed=1)[:12]
    src = [randn(s, device=device, seed=70 + i) for i, s in enumerate(shapes)]
    for decay in DECAYS:
        ema = [randn(s, device=device, seed=i) for i, s in enumerate(shapes)]
        lerped = [e.clone() for e in ema]
        torch._foreach_lerp_(lerped, src, 1.0 - decay)
        scale = [e.abs() + s.abs() for e, s in zip(ema, src)]
        ema_update_(ema, src, decay, backend="triton")
        for i, (e, expected) in enumerate(zip(ema, lerped)):
            if decay in (0.0, 1.0):
                assert_bitwise_equal(e, expected, f"ema[{i}] at decay {decay}")
            else:
                assert ((e - expected).abs() <= 2 * U32 * scale[i]).all(), f"ema[{i}] at decay {decay}"


def test_offsets_past_two_to_the_31_use_int64(device):
    """Only the tail of 2**31 + 4103-element tensors is touched: CPU pages are reserved lazily, so
    this needs little real memory; the launcher processes just the element range around 2**31."""
    n = 2**31 + 4096 + 7
    lo = 2**31 - 1024  # full blocks crossing 2**31, then a masked tail of 7
    try:
        ema = torch.empty(n, device=device)
        src = torch.empty(n, dtype=torch.bfloat16, device=device)
        shadow = torch.empty(n, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError) as exc:  # no overcommit / small GPU: cannot test here
        pytest.skip(f"cannot reserve 2**31-element tensors: {exc}")
    ema[lo - 64:] = randn((n - lo + 64,), device=device, seed=1)
    src[lo:] = randn((n - lo,), torch.bfloat16, device, seed=2)
    shadow[lo - 64:] = float("nan")
    expected_ema, expected_shadow = ema[lo - 64:].clone(), shadow[lo - 64:].clone()
    ema_update_reference_([expected_ema[64:]], [src[lo:]], 0.3, [expected_shadow[64:]])

    ema_mod._ema_update_triton([ema], [src], [shadow], 0.3, element_range=(lo, n))
    assert_bitwise_equal(ema[lo - 64:], expected_ema, "ema tail past 2**31 (64-element guard in front)")
    assert_bitwise_equal(shadow[lo - 64:], expected_shadow, "shadow tail past 2**31")


def test_chunk_tables_are_cached_and_rebuilt_when_tensors_change(device, monkeypatch):
    builds = []
    real = ema_triton.build_groups
    monkeypatch.setattr(ema_triton, "build_groups", lambda *a: builds.append(1) or real(*a))
    ema = [randn((9,), device=device, seed=1), randn((4, 4), device=device, seed=2)]
    src = [randn((9,), device=device, seed=3), randn((4, 4), device=device, seed=4)]
    averager = MultiTensorEMA(ema, backend="triton")
    averager.update(src, decay=0.0)
    averager.update(src, decay=0.25)
    assert len(builds) == 1
    new_src = [src[0], randn((4, 4), device=device, seed=5)]  # a new address: the table must follow
    ref = [e.clone() for e in ema]
    averager.update(new_src, decay=0.375)
    ema_update_reference_(ref, new_src, 0.375)
    assert len(builds) == 2
    for i in range(2):
        assert_bitwise_equal(ema[i], ref[i], f"ema[{i}] after the source moved")


def test_auto_backend_on_cpu_without_interpreter_runs_the_reference(monkeypatch, launches):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ema, src = [randn((33,), seed=1)], [randn((33,), torch.bfloat16, seed=2)]
    ref = [ema[0].clone()]
    ema_update_(ema, src, 0.6, backend="auto")
    ema_update_reference_(ref, src, 0.6)
    assert launches == []
    assert_bitwise_equal(ema[0], ref[0], "ema")
    with pytest.raises(KernelBackendError, match="interpreter is off"):
        ema_update_(ema, src, 0.6, backend="triton")


def test_empty_lists_and_empty_tensors(launches):
    ema_update_([], [], 0.5, backend="triton")
    ema, src = [torch.empty(0), torch.ones(3)], [torch.empty(0, dtype=torch.bfloat16), torch.zeros(3)]
    ema_update_(ema, src, 0.5, backend="triton")
    assert torch.equal(ema[1], torch.full((3,), 0.5))
    assert len(launches) == 1


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: ([torch.zeros(2), torch.zeros(3)], [torch.zeros(2)], None), ValueError,
         r"src list has 1 tensors but the ema list has 2"),
        (lambda: ([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], None), TypeError,
         r"ema\[0\] must be float32, got torch.bfloat16"),
        (lambda: ([torch.zeros(2), torch.zeros(4, 3)], [torch.zeros(2), torch.zeros(3, 4)], None), ValueError,
         r"src\[1\] has shape \(3, 4\) but ema\[1\] has shape \(4, 3\)"),
        (lambda: ([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], None), TypeError,
         r"src\[0\] has dtype torch.float64"),
        (lambda: ([torch.zeros(3, 4)], [torch.zeros(4, 3).t()], None), ValueError,
         r"src\[0\] must be contiguous \(shape \(3, 4\), stride \(1, 3\)\)"),
        (lambda: ([torch.zeros(4, 3).t()], [torch.zeros(3, 4)], None), ValueError, r"ema\[0\] must be contiguous"),
        (lambda: ([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(3, dtype=torch.bfloat16)]), ValueError,
         r"shadow\[0\] has shape \(3,\) but ema\[0\] has shape \(2,\)"),
        (lambda: ([torch.zeros(2)], [torch.zeros(2)], []), ValueError,
         r"shadow list has 0 tensors but the ema list has 1"),
        (lambda: ([torch.zeros(2)], [torch.zeros(2, dtype=torch.int32)], None), TypeError,
         r"src\[0\] has dtype torch.int32"),
    ],
)
def test_bad_inputs_name_the_problem(backend, make, error, message):
    ema, src, shadow = make()
    with pytest.raises(error, match=message):
        ema_update_(ema, src, 0.5, shadow=shadow, backend=backend)


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan"), float("inf")])
def test_decay_outside_unit_interval_is_rejected(decay):
    with pytest.raises(ValueError, match="EMA decay must be a finite number in"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], decay)


def test_unknown_backend_is_rejected_even_for_empty_lists():
    with pytest.raises(KernelBackendError, match="unknown kernel backend 'cuda'"):
        ema_update_([], [], 0.5, backend="cuda")
    with pytest.raises(KernelBackendError, match="unknown kernel backend"):
        MultiTensorEMA([torch.zeros(2)], backend="fast")


def test_rejected_update_changes_nothing():
    """Every input is checked before anything is written (the teacher advances its schedule after the
    update, so a rejected update leaves the schedule unchanged too)."""
    ema = [torch.zeros(2)]
    averager = MultiTensorEMA(ema, backend="eager")
    with pytest.raises(ValueError, match=r"src\[0\] has shape"):
        averager.update([torch.zeros(3)], decay=0.0)
    with pytest.raises(ValueError, match="finite number in \\[0, 1\\]"):
        averager.update([torch.ones(2)], decay=1.5)
    assert torch.equal(ema[0], torch.zeros(2))
    averager.update([torch.ones(2)], decay=0.0)
    assert torch.equal(ema[0], torch.ones(2))


# --------------------------------------------------------------------------------------------------
# Host path: validate once, then compare a fingerprint and launch (issue 12 item 5)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def validations(monkeypatch):
    """Counts full validations (each one checks every source tensor)."""
    calls = []
    real = ema_mod._check_sources
    monkeypatch.setattr(ema_mod, "_check_sources", lambda *a: calls.append(1) or real(*a))
    return calls


def test_steady_state_calls_validate_once(device, validations, launches):
    ema = [randn((9,), device=device, seed=1), randn((4, 4), device=device, seed=2)]
    src = [randn((9,), torch.bfloat16, device=device, seed=3), randn((4, 4), device=device, seed=4)]
    shadow = [torch.empty(9, dtype=torch.bfloat16, device=device), torch.empty(4, 4, dtype=torch.float16, device=device)]
    averager = MultiTensorEMA(ema, shadow_tensors=shadow, backend="triton")
    for decay in (0.0, 0.45, 0.57375):
        averager.update(src, decay=decay)
    assert len(validations) == 1
    ref, ref_shadow = [e.clone() for e in ema], [s.clone() for s in shadow]
    for step in range(3):  # the functional API: a new list object each call, same tensors
        ema_update_(list(ema), list(src), 0.5, shadow=list(shadow), backend="triton")
    assert len(validations) == 2
    for step in range(3):
        ema_update_reference_(ref, src, 0.5, ref_shadow)
    assert len(launches) == 6 + 6  # two dtype groups per update
    for i in range(2):
        assert_bitwise_equal(ema[i], ref[i], f"ema[{i}]")
        assert_bitwise_equal(shadow[i], ref_shadow[i], f"shadow[{i}]")


def _swap_storage(t: torch.Tensor) -> None:
    t.data = t.data.clone()  # same shape and dtype, new storage


def _swap_dtype_same_address(t: torch.Tensor) -> None:
    # A bfloat16 view of the first half of the same memory: same data pointer, new dtype.
    t.data = t.data.view(torch.bfloat16)[: t.numel()].view(t.shape)


def _regrow(t: torch.Tensor) -> None:
    t.resize_(t.numel() * 64)  # a reallocating resize: same tensor object, new address
    t.resize_(16)


@pytest.mark.parametrize("change", [_swap_storage, _swap_dtype_same_address, _regrow],
                         ids=["new-storage", "new-dtype-same-address", "reallocating-resize"])
@pytest.mark.parametrize("which", ["src", "ema"])
def test_changed_tensor_after_first_call_is_detected(device, validations, change, which):
    """A tensor whose storage, dtype or size changed between calls is validated again and the update
    uses its new memory, never the addresses of the first call."""
    if which == "ema" and change is _swap_dtype_same_address:
        pytest.skip("an EMA must stay float32 (covered by the rejection test below)")
    ema = [randn((16,), device=device, seed=1)]
    src = [randn((16,), device=device, seed=2)]
    averager = MultiTensorEMA(ema, backend="triton")
    averager.update(src, decay=0.0)
    target = src[0] if which == "src" else ema[0]
    old_ptr = target.data_ptr()
    change(target)
    assert target.data_ptr() != old_ptr or change is _swap_dtype_same_address
    ref = [ema[0].clone()]
    averager.update(src, decay=0.25)
    assert len(validations) == 2
    ema_update_reference_(ref, src, 0.25)
    assert_bitwise_equal(ema[0], ref[0], "ema after the change")


def test_shrunk_or_retyped_tensor_at_the_same_address_is_rejected(device):
    """Same data pointer, new element count (a shorter view swapped in): validation names it instead of
    launching over the old 16 elements. Same for an EMA re-typed in place."""
    ema = [randn((16,), device=device, seed=1)]
    src = [randn((16,), device=device, seed=2)]
    averager = MultiTensorEMA(ema, backend="triton")
    averager.update(src, decay=0.0)
    src[0].data = src[0].data[:8]
    with pytest.raises(ValueError, match=r"src\[0\] has shape \(8,\) but ema\[0\] has shape \(16,\)"):
        averager.update(src, decay=0.25)
    src[0].data = randn((16,), device=device, seed=3)
    averager.update(src, decay=0.25)
    ema[0].data = ema[0].data.view(torch.int32)
    with pytest.raises(TypeError, match=r"ema\[0\] must be float32"):
        averager.update(src, decay=0.25)


def test_round_to_float32_matches_torch():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.rand(20000, generator=g, dtype=torch.float64),
        torch.rand(2000, generator=g, dtype=torch.float64) * 2.0**-120,  # float32 subnormals below 2**-126
        torch.tensor([0.0, 1.0, 0.5, 2.0**-149, 2.0**-150, 3 * 2.0**-151, 2.0**-126, 1 - 2.0**-60,
                      1 - 2.0**-25, 1 - 3 * 2.0**-26], dtype=torch.float64),
    ])
    # Exact ties between neighbouring float32 values of [0.5, 1) (must round to even).
    lo = torch.rand(2000, generator=g).clamp_min(0.5)
    ties = lo.double() + 2.0**-25
    values = torch.cat([values, ties])
    got = torch.tensor([ema_mod._round_to_float32(v) for v in values.tolist()], dtype=torch.float64)
    assert torch.equal(got, values.float().double())


def test_eager_reference_traces_without_a_graph_break():
    """torch.compile of the reference captures one graph (the float32 rounding of 1 - d is host
    arithmetic, not a tensor .item())."""
    torch._dynamo.reset()
    ema = [randn((9,), seed=1), randn((4, 4), seed=2)]
    src = [randn((9,), torch.bfloat16, seed=3), randn((4, 4), seed=4)]
    shadow = [torch.empty(9, dtype=torch.bfloat16), torch.empty(4, 4, dtype=torch.bfloat16)]
    explanation = torch._dynamo.explain(ema_update_reference_)(ema, src, 0.99, shadow)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
