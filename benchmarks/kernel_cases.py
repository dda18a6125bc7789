"""The kernel benchmark cases: each fused kernel beside its eager reference and ``torch.compile`` of
that reference (and, for the EMA, ``torch._foreach_lerp_``), on Qwen-Image shapes.

A :class:`KernelCase` is a cheap description (it is a pytest parameter); :func:`prepare` allocates its
tensors on a device and returns a bench object exposing, per (variant, pass), a zero-argument callable
to time, the bytes that call moves (memory-bound kernels only) and a check that the variant computes
what the eager reference computes (so the suite never times the wrong thing).

Bytes moved are computed from the shapes and dtypes as the traffic of the *fused* kernel (what it must
read and write, see each ``bytes_moved``); the eager and compiled variants are reported against the
same count, i.e. as effective bandwidth for the same useful work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from twinflow.method.config import TwinFlowConfig
from twinflow.method.loss_math import guide_rows, twinflow_loss_reference
from twinflow.method.objective import TwinFlowObjective
from twinflow.method.times import assign_group_times, sample_base_times

from .harness import Timing, TimingPlan, plan_for

EMA_DECAY = 0.99
"""Decay of the timed EMA updates (the method's default target; the update's cost does not depend on it
except for the first, copying, update, which is never timed)."""
QWEN_WIDTH = 3072
TIME_CHANNELS = 256
CHECK_MAX_ELEMENTS = 300_000_000
"""Larger cases skip the variant-agreement check: it needs two extra copies of every tensor."""


@dataclass(frozen=True)
class KernelCase:
    kernel: str  # "ema" | "twinflow_loss" | "dual_time_embedding"
    name: str
    variants: tuple[str, ...]
    passes: tuple[str, ...]
    size: dict = field(hash=False, compare=False)
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.kernel}/{self.name}"


def lora_shapes(width: int, rank: int, blocks: int) -> list[tuple[int, int]]:
    """Shapes of a LoRA adapter's A (rank x in) and B (out x rank) matrices on the backbone's default
    targets, per double-stream block: 8 attention projections (D -> D, both streams) and, per stream, the
    MLP's D -> 4D and 4D -> D. The EMA of such an adapter is a list of many small tensors."""
    per_block = [(width, width)] * 8 + [(width, 4 * width), (4 * width, width)] * 2
    shapes = []
    for _ in range(blocks):
        for fan_in, fan_out in per_block:
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


def kernel_cases(profile: str) -> list[KernelCase]:
    """Every kernel case of a profile, ordered so consecutive tests share one allocation."""
    ema_variants = ("fused", "eager", "compile", "foreach")
    list_variants = ("fused", "eager", "foreach")
    list_note = ("no torch.compile variant: dynamo traces the reference's Python loop over the list, so the "
                 "graph would hold one update per tensor, specialised to this list; the per-tensor loop itself "
                 "is the eager baseline")
    kernel_variants = ("fused", "eager", "compile")
    passes = ("fwd", "fwd+bwd")
    if profile == "gpu":
        ema = [
            KernelCase("ema", "flat_1e8_shadow_bf16", ema_variants, ("update",), {"shapes": [(100_000_000,)], "shadow": True}),
            KernelCase("ema", "flat_1e8", ema_variants, ("update",), {"shapes": [(100_000_000,)], "shadow": False}),
            KernelCase("ema", "flat_2.55e9_shadow_bf16", ema_variants, ("update",),
                       {"shapes": [(2_550_000_000,)], "shadow": True}),
            KernelCase("ema", "lora_r32_60blocks_shadow_bf16", list_variants, ("update",),
                       {"shapes": lora_shapes(QWEN_WIDTH, 32, 60), "shadow": True}, list_note),
        ]
        loss = [
            KernelCase("twinflow_loss", f"b{b}_{c}x{h}x{w}", kernel_variants, passes, {"batch": b, "latent": (c, h, w)})
            for (c, h, w) in ((16, 64, 64), (16, 128, 128)) for b in (4, 16)
        ]
        emb = [
            KernelCase("dual_time_embedding", f"b{b}_d{QWEN_WIDTH}", kernel_variants, passes,
                       {"batch": b, "width": QWEN_WIDTH})
            for b in (4, 16)
        ]
    else:
        ema = [
            KernelCase("ema", "flat_5e4_shadow_bf16", ema_variants, ("update",), {"shapes": [(50_000,)], "shadow": True}),
            KernelCase("ema", "flat_5e4", ema_variants, ("update",), {"shapes": [(50_000,)], "shadow": False}),
            KernelCase("ema", "lora_r4_1block_d64_shadow_bf16", list_variants, ("update",),
                       {"shapes": lora_shapes(64, 4, 1), "shadow": True}, list_note),
        ]
        loss = [KernelCase("twinflow_loss", "b4_4x16x16", kernel_variants, passes, {"batch": 4, "latent": (4, 16, 16)})]
        emb = [KernelCase("dual_time_embedding", "b4_d64", kernel_variants, passes, {"batch": 4, "width": 64})]
    return ema + loss + emb


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (Qwen-Image's training dtype); float32 on CPU, where the smoke runs only check the
    harness and inductor's CPU bf16 paths would dominate the compile time."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fresh_compile(fn: Callable) -> Callable:
    """``torch.compile(fn)`` that owes nothing to earlier cases. Dynamo caches compiled code on ``fn``'s
    code object, so the second case compiling the same reference would be a recompile: marked dynamic
    (automatic dynamic shapes after a shape change) and measured against guards of the first case.
    ``torch._dynamo.reset()`` drops those caches and ``dynamic=False`` compiles this case's shapes
    statically, as a user compiling for one shape would. Call it when a case is prepared."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def _assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = _max_rel_err(got, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: max error {err:.3g} relative to the eager reference exceeds {tol:g}")


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------
class EMABench:
    """``ema <- d ema + (1 - d) src`` over float32 sources (the master weights a ZeRO-3 rank or a LoRA
    adapter holds), optionally writing the bf16 shadow the teacher runs with, in place."""

    def __init__(self, case: KernelCase, device: torch.device):
        from twinflow.kernels.ema import ema_update_, ema_update_reference_

        shapes = case.size["shapes"]
        self.case, self.device = case, device
        self.src = [torch.randn(s, device=device) for s in shapes]
        self.ema = [torch.randn(s, device=device) for s in shapes]
        self.shadow = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes] if case.size["shadow"] else None
        self.numel = sum(t.numel() for t in self.src)
        self._fns: dict[str, Callable[[], None]] = {
            "fused": lambda: ema_update_(self.ema, self.src, EMA_DECAY, shadow=self.shadow, backend="triton"),
            "eager": lambda: ema_update_reference_(self.ema, self.src, EMA_DECAY, shadow_list=self.shadow),
            "foreach": self._foreach,
        }
        if "compile" in case.variants:
            compiled = fresh_compile(ema_update_reference_)
            self._fns["compile"] = lambda: compiled(self.ema, self.src, EMA_DECAY, self.shadow)

    def _foreach(self) -> None:
        torch._foreach_lerp_(self.ema, self.src, 1.0 - EMA_DECAY)
        if self.shadow is not None:
            torch._foreach_copy_(self.shadow, self.ema)

    def fn(self, variant: str, pass_: str) -> Callable[[], None]:
        return self._fns[variant]

    def bytes_moved(self, pass_: str) -> int:
        """Per element: read the float32 source (4) and EMA (4), write the EMA (4) and the bf16 shadow (2)."""
        per_element = 4 + 4 + 4 + (2 if self.shadow is not None else 0)
        return self.numel * per_element

    def check(self, variant: str, pass_: str) -> Optional[str]:
        if self.numel > CHECK_MAX_ELEMENTS:
            return f"not checked: {self.numel:.3g} elements > {CHECK_MAX_ELEMENTS:.0e}"
        start = [e.clone() for e in self.ema]

        def run(v: str) -> list[torch.Tensor]:
            for e, s in zip(self.ema, start):
                e.copy_(s)
            self._fns[v]()
            return [e.clone() for e in self.ema] + ([s.clone() for s in self.shadow] if self.shadow else [])

        ref, got = run("eager"), run(variant)
        for e, s in zip(self.ema, start):
            e.copy_(s)
        for i, (g, r) in enumerate(zip(got, ref)):
            _assert_close(f"ema {variant} tensor {i}", g, r, 1e-2 if g.dtype == torch.bfloat16 else 1e-6)
        return "agrees with the eager reference"


# --------------------------------------------------------------------------------------------------
# TwinFlow loss
# --------------------------------------------------------------------------------------------------
class LossBench:
    """The loss arithmetic of one step with every part on (guidance, RCGM, rectification), on inputs
    laid out exactly as ``TwinFlowObjective`` produces them for the default TwinFlow preset: ``F`` in the
    compute dtype, the targets and teacher outputs float32, groups e2e/mul/any/adv in batch order."""

    def __init__(self, case: KernelCase, device: torch.device):
        from twinflow.method.loss_math import twinflow_loss

        batch, latent = case.size["batch"], case.size["latent"]
        self.case, self.device = case, device
        objective = TwinFlowObjective(TwinFlowConfig())
        self.arith = objective.arith
        split = objective.split(batch)
        torch.manual_seed(0)
        cfg = objective.config
        t0, tt0, t_min = sample_base_times(batch, cfg.time_dist_ctrl, cfg.consistc_ratio, device)
        times = assign_group_times(t0, tt0, t_min, split)
        self.t, self.tt = times.t, times.tt
        self.adv = split.masks(device)["adv"]
        self.loss_rows = torch.ones_like(self.adv)
        shape = (batch, *latent)
        dtype = compute_dtype(device)
        self.F = torch.randn(shape, device=device).to(dtype)
        self.F_grad = self.F.clone().requires_grad_(True)
        self.target = torch.randn(shape, device=device)
        guided = guide_rows(self.t, self.adv, self.arith)
        rows = guided.view(-1, 1, 1, 1)
        self.v_c = torch.where(rows, torch.randn(shape, device=device), 0.0)
        self.v_u = torch.where(rows, torch.randn(shape, device=device), 0.0)
        self.acc = torch.where(~self.adv.view(-1, 1, 1, 1), torch.randn(shape, device=device) * 0.01, 0.0)
        self.n_e2e = split.sizes["e2e"]
        self.rect_diff = torch.randn((self.n_e2e, *latent), device=device) * 0.1
        self.rows = {"all": batch, "guided": int(guided.sum()), "non_adv": int((~self.adv).sum()), "e2e": self.n_e2e}
        self.n = self.F[0].numel()
        compiled = fresh_compile(twinflow_loss_reference)
        self._impls = {
            "fused": lambda *a, **k: twinflow_loss(*a, backend="triton", **k),
            "eager": twinflow_loss_reference,
            "compile": compiled,
        }

    def _call(self, variant: str, F: torch.Tensor):
        return self._impls[variant](F, self.target, self.t, self.tt, self.adv, self.loss_rows, self.arith,
                                    v_c=self.v_c, v_u=self.v_u, rcgm_acc=self.acc, rect_diff=self.rect_diff)

    def fn(self, variant: str, pass_: str) -> Callable[[], object]:
        if pass_ == "fwd":
            def forward():
                with torch.no_grad():
                    return self._call(variant, self.F)
            return forward

        def forward_backward():
            base, rect = self._call(variant, self.F_grad)
            return torch.autograd.grad(base + rect, self.F_grad)
        return forward_backward

    def bytes_moved(self, pass_: str) -> int:
        """What the fused kernel reads and writes. Forward: F (all rows, compute dtype), target (all rows),
        v_c and v_u (guided rows), the RCGM integral (non-adv rows), v_fake - v_real (e2e rows), all float32.
        With a gradient the forward also writes the float32 residuals F - y (all rows) and F - y_rect
        (e2e rows), and the backward reads them and writes dL/dF in F's dtype. Per-row partial sums are
        negligible and not counted."""
        n, r, f = self.n, self.rows, self.F.element_size()
        forward = n * (r["all"] * (f + 4) + 2 * r["guided"] * 4 + r["non_adv"] * 4 + r["e2e"] * 4)
        if pass_ == "fwd":
            return forward
        residuals = n * (r["all"] + r["e2e"]) * 4
        return forward + residuals + residuals + n * r["all"] * f

    def check(self, variant: str, pass_: str) -> Optional[str]:
        tol = 1e-2 if self.F.dtype == torch.bfloat16 else 1e-4
        ref, got = self.fn("eager", pass_)(), self.fn(variant, pass_)()
        names = ("base", "rect") if pass_ == "fwd" else ("dF",)
        for name, g, r in zip(names, got, ref):
            _assert_close(f"loss {variant} {name}", g, r, tol)
        return "agrees with the eager reference"


# --------------------------------------------------------------------------------------------------
# Dual-time embedding
# --------------------------------------------------------------------------------------------------
class TimeEmbeddingBench:
    """``E1(t) + E2(tt)(t - tt)`` with Qwen-Image's embedder shapes (256 -> D -> D, twice)."""

    def __init__(self, case: KernelCase, device: torch.device):
        from twinflow.kernels.dual_time_embedding import dual_time_embedding_reference, dual_time_embedding_triton

        batch, width = case.size["batch"], case.size["width"]
        self.case, self.device = case, device
        self.dtype = compute_dtype(device)
        torch.manual_seed(0)
        self.t = torch.rand(batch, device=device)
        self.tt = self.t * torch.rand(batch, device=device)
        shapes = [(width, TIME_CHANNELS), (width,), (width, width), (width,)] * 2
        self.weights = [(torch.randn(s, device=device) * s[-1] ** -0.5).to(self.dtype).requires_grad_(True) for s in shapes]
        self.grad_out = torch.randn(batch, width, device=device).to(self.dtype)
        compiled = fresh_compile(dual_time_embedding_reference)
        self._impls = {"fused": dual_time_embedding_triton, "eager": dual_time_embedding_reference, "compile": compiled}

    def fn(self, variant: str, pass_: str) -> Callable[[], object]:
        impl = self._impls[variant]
        if pass_ == "fwd":
            def forward():
                with torch.no_grad():
                    return (impl(self.t, self.tt, *self.weights, self.dtype),)
            return forward

        def forward_backward():
            out = impl(self.t, self.tt, *self.weights, self.dtype)
            return torch.autograd.grad(out, self.weights, self.grad_out)
        return forward_backward

    def bytes_moved(self, pass_: str) -> None:
        """Not reported: at batch <= 16 the cost is launches and weight reads, not a streaming pass."""
        return None

    def check(self, variant: str, pass_: str) -> Optional[str]:
        tol = 2e-2 if self.dtype == torch.bfloat16 else 1e-4
        ref, got = self.fn("eager", pass_)(), self.fn(variant, pass_)()
        for i, (g, r) in enumerate(zip(got, ref)):
            _assert_close(f"dual-time embedding {variant} output {i}", g, r, tol)
        return "agrees with the eager reference"


BENCHES = {"ema": EMABench, "twinflow_loss": LossBench, "dual_time_embedding": TimeEmbeddingBench}


def prepare(case: KernelCase, device: torch.device):
    """Allocates a case's tensors on ``device``."""
    return BENCHES[case.kernel](case, device)


Timer = Callable[[Callable[[], object], TimingPlan], Optional[Timing]]


def measure_variant(bench, variant: str, pass_: str, profile: str, timer: Timer,
                    quick: bool = False) -> tuple[Optional[Timing], Optional[str]]:
    """Checks one variant against the eager reference, then times it with ``timer(fn, plan)``.

    The first call (torch.compile, Triton compilation, autotuning, allocator growth) is never timed; on
    GPU the rounds are sized from the second. ``quick`` (pytest-benchmark disabled) skips both, so the
    body runs once after the check.
    """
    check = bench.check(variant, pass_)
    fn = bench.fn(variant, pass_)
    if quick:
        return timer(fn, TimingPlan(rounds=1, iterations=1, warmup=0)), check
    fn()
    return timer(fn, plan_for(fn, bench.device, profile)), check
