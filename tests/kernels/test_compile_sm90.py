"""Every Triton kernel compiled for the GPU the project targets (sm_90), without a GPU.

The interpreter runs the kernels' CPU substitutes (kernels/_common.py); this test compiles the code a GPU
runs, with Triton's bundled ``ptxas``, so CI at least proves it is valid Triton for this version (it
runs nothing: the cuda-marked tests check results on a GPU). It also checks in the PTX what the
docstrings promise of the compiled code: IEEE divisions (``div.rn``, never the approximate
``div.full``) in the loss, libdevice calls for sin/cos/tan/pow, and no FMA where a kernel is compiled
without contraction.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = ("ema", "twinflow_loss", "dual_time_embedding")


@pytest.fixture(scope="module")
def compile_report() -> dict:
    """Runs this file as a script in a fresh process with the interpreter off (Triton cannot switch
    modes inside a process that has imported it interpreted): one line per check, 'ok' or the error."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    report = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in CHECKS)
    assert set(report) == set(CHECKS), proc.stdout + proc.stderr
    return report


@pytest.mark.parametrize("check", CHECKS)
def test_kernels_compile_for_sm90(compile_report, check):
    assert compile_report[check] == "ok", compile_report[check]


# --------------------------------------------------------------------------------------------------
# The script part (compiled mode)
# --------------------------------------------------------------------------------------------------
def _compile(kernel, types_by_name: dict, constexprs: dict, **options) -> str:
    """PTX of ``kernel`` for sm_90. Parameters not in ``types_by_name`` are float32 pointers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Which parameters are compile-time constants comes from the kernel itself, as when a GPU launches it
    # (``JITFunction.params``, read from the annotations): naming them here instead once hid kernels that
    # had lost their ``tl.constexpr`` annotations and failed to compile at their first launch on a GPU.
    own = {p.name for p in kernel.params if p.is_constexpr}
    assert own == set(constexprs), f"{kernel.__name__}: the kernel's constexpr parameters are {sorted(own)}"
    signature = {}
    for name in kernel.arg_names:
        signature[name] = "constexpr" if name in constexprs else types_by_name.get(name, "*fp32")
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def check_ema():
    from twinflow.kernels import ema_triton

    for src_kind, shadow_kind in ((0, -1), (1, 1), (2, 2)):
        ptx = _compile(ema_triton._kernels(False).chunk_table, {"table_ptr": "*i64", "coef": "fp32"},
                       {"SRC_KIND": src_kind, "SHADOW_KIND": shadow_kind, "MODE": 1, "ALIGNED": True,
                        "BLOCK": ema_triton.BLOCK}, enable_fp_fusion=False)
        assert "fma.rn.f32" not in ptx  # a + c * (b - a) with two roundings, as the reference


def check_twinflow_loss():
    from twinflow.kernels import twinflow_loss as loss

    rows, epilogue, grad = loss._kernels(False)
    ints = {n: "i32" for n in ("n", "n_blocks", "E", "B", "stride_f", "stride_t", "stride_vc", "stride_vu",
                               "stride_acc", "stride_rd")}
    floats = {n: "fp32" for n in ("enhanced_ratio", "enhanced_range_lo", "enhanced_range_hi", "rcgm_delta", "n_f",
                                  "e_f", "c", "alpha_gap", "exponent", "c2_eps", "dist_match_cof", "time_angle")}
    ptx = _compile(rows, {**ints, **floats, "F": "*bf16", "adv_ptr": "*u8"},
                   {"HAS_GUIDE": True, "REPLACE": False, "HAS_RCGM": True, "HAS_RECT": True, "SAVE_RES": True,
                    "BLOCK": 1024}, enable_fp_fusion=False)
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "fma.rn.f32" not in ptx
    ptx = _compile(epilogue, {**ints, **floats, "adv_ptr": "*u8", "sel_ptr": "*u8"},
                   {"LOSS": loss._BARRON, "BLOCK_B": 16, "BLOCK_P": 16}, enable_fp_fusion=False)
    assert "div.full" not in ptx and "__nv_tanf" in ptx and "__nv_powf" in ptx
    ptx = _compile(grad, {**ints, "dF_ptr": "*bf16"}, {"HAS_RECT": True, "BLOCK": 1024}, enable_fp_fusion=False)
    assert "cvt.rn.bf16" in ptx  # the native round-to-nearest-even cast, not the integer substitute


def check_dual_time_embedding():
    from twinflow.kernels import dual_time_embedding_triton as dte
    from twinflow.kernels.dual_time_rule import RULES

    k = dte._kernels(False)
    ints = {n: "i32" for n in ("stride_t", "stride_tt", "B", "D", "H", "C", "N", "M", "g_group_stride")}
    bf16 = {n: "*bf16" for n in ("proj_ptr", "w_a_ptr", "w_b_ptr", "bias_a_ptr", "bias_b_ptr", "pre_ptr", "h_ptr",
                                 "out_ptr", "g_ptr", "da_ptr", "x_ptr", "dw_ptr", "db_ptr", "extra_ptr", "parts_ptr")}
    _compile(k.linear1_silu, {**ints, **bf16}, {"STORE_PRE": True, "BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 64})
    # Each backbone's rule is its own specialisation of the kernels that read it (float32 times: the
    # loads are typed by the pointers, as at a launch).
    for rule in RULES.values():
        times, coef = dte.rule_constexprs(rule)
        ptx = _compile(k.sinusoid, {**ints, **bf16}, {"HALF": 128, **times, "BLOCK_B": 16, "BLOCK_H": 128})
        assert "__nv_sinf" in ptx and "__nv_cosf" in ptx and "sin.approx" not in ptx
        if rule.float64_times:
            assert "cvt.rn.f32.f64" in ptx  # the float64 time rounded once to float32, as torch's .float()
        flags = {"HAS_EXTRA": rule.extra_inputs, "STORE_PARTS": rule.name == "sana"}
        ptx = _compile(k.linear2_combine, {**ints, **bf16}, {**coef, **flags, "BLOCK_B": 16, "BLOCK_N": 16,
                                                            "BLOCK_K": 64})
        if rule.coefficient_divisor != 1.0:
            assert "div.rn.f32" in ptx and "div.full" not in ptx
        for scale in (True, False):
            _compile(k.linear2_dgrad_silu, {**ints, **bf16}, {**coef, "SCALE_GROUP1": scale, "BLOCK_B": 16,
                                                              "BLOCK_M": 64, "BLOCK_K": 64})
            _compile(k.weight_grad, {**ints, **bf16}, {**coef, "SCALE_GROUP1": scale, "BLOCK_N": 64, "BLOCK_M": 64,
                                                       "BLOCK_B": 16})

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    for name in CHECKS:
        try:
            globals()["check_" + name]()
            print(name, "ok", flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            print(name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], flush=True)
