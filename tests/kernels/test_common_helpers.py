"""The helpers that differ between compiled and interpreted kernels (kernels/_common.py), checked for
what the kernels' docstrings claim of them: on CPU through the interpreter substitutes and, with the
``cuda`` marker (``device`` fixture), on a GPU with the code the GPU runs.

* ``_cast`` to bf16: round to nearest even, bitwise equal to ``torch.Tensor.to`` (both modes).
* ``_dot`` on bf16 operands, float32 accumulation: within ``K * 2**-23 * sum_k |a_ik b_kj|`` of the
  float64 product (the products are exact; each of the K additions errs by less than one float32 ulp,
  2**-23 relative: 2**-24 with round to nearest, as on CPU, and up to 2**-23 where tensor cores
  truncate), in both modes.
* ``_sin``, ``_cos``, ``_tan``, ``_pow``: on a GPU bitwise equal to torch's CUDA functions (both call
  the CUDA math library); on CPU within a few ulp (numpy float32 vs torch's CPU functions).
* ``tl.math.div_rn``: bitwise equal to torch's float32 division (IEEE round to nearest) in both modes.
"""
from __future__ import annotations

import pytest
import torch

from twinflow.kernels._common import interpreter_enabled, jit_kernels


def _helpers_body(x_ptr, y_ptr, cast_ptr, sin_ptr, cos_ptr, tan_ptr, pow_ptr, div_ptr, exponent,
                  N: tl.constexpr):  # noqa: F821
    offs = tl.arange(0, N)  # noqa: F821
    x = tl.load(x_ptr + offs)  # noqa: F821
    y = tl.load(y_ptr + offs)  # noqa: F821
    tl.store(cast_ptr + offs, _cast(x, tl.bfloat16))  # noqa: F821
    tl.store(sin_ptr + offs, _sin(x))  # noqa: F821
    tl.store(cos_ptr + offs, _cos(x))  # noqa: F821
    tl.store(tan_ptr + offs, _tan(x))  # noqa: F821
    tl.store(pow_ptr + offs, _pow(tl.abs(y), exponent))  # noqa: F821
    tl.store(div_ptr + offs, tl.math.div_rn(x, y))  # noqa: F821


def _dot_body(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):  # noqa: F821
    m = tl.arange(0, M)  # noqa: F821
    k = tl.arange(0, K)  # noqa: F821
    n = tl.arange(0, N)  # noqa: F821
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])  # noqa: F821
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])  # noqa: F821
    acc = _dot(a, b, tl.zeros((M, N), dtype=tl.float32))  # noqa: F821
    tl.store(c_ptr + m[:, None] * N + n[None, :], acc)  # noqa: F821


def _kernels():
    import triton.language as tl

    return jit_kernels((_helpers_body, _dot_body), interpreter_enabled(), {**globals(), "tl": tl})


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


def test_elementwise_helpers(device):
    g = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
    x[:8] = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.3e38, float("nan"), float("inf"), 1.0 + 2.0**-8])
    y = torch.randn(n, generator=g) + 1.5
    x, y = x.to(device), y.to(device)
    outs = [torch.empty(n, dtype=torch.bfloat16, device=device)] + [torch.empty(n, device=device) for _ in range(5)]
    exponent = -0.75
    helpers, _ = _kernels()
    helpers[(1,)](x, y, *outs, exponent, N=n, enable_fp_fusion=False)
    cast, sin, cos, tan, pw, div = outs
    expected_cast = x.to(torch.bfloat16)
    assert torch.equal(cast.view(torch.int16)[~x.isnan()], expected_cast.view(torch.int16)[~x.isnan()])
    assert cast[x.isnan()].isnan().all()
    torch.testing.assert_close(div, x / y, rtol=0, atol=0, equal_nan=True)
    finite = x.isfinite() & (x.abs() < 1e4)  # libm / libdevice range reduction regime of the kernels
    want = {"sin": torch.sin(x), "cos": torch.cos(x), "tan": torch.tan(x), "pow": torch.pow(y.abs(), exponent)}
    got = {"sin": sin, "cos": cos, "tan": tan, "pow": pw}
    for name in want:
        mask = finite if name != "pow" else torch.ones_like(finite)
        if device.type == "cuda":
            torch.testing.assert_close(got[name][mask], want[name][mask], rtol=0, atol=0, msg=name)
        else:
            # numpy vs torch CPU: each within 1 ulp of the exact value for sin/cos (2 allowed); tan as
            # sin/cos and pow as exp2(p log2 x) add a few roundings (measured <= 3 ulp; 8 allowed).
            bound = 2 if name in ("sin", "cos") else 8
            assert ulp_distance(got[name][mask], want[name][mask]).max().item() <= bound, name


@pytest.mark.parametrize("k", [16, 64])
def test_dot_bf16_accumulates_in_float32(device, k):
    g = torch.Generator().manual_seed(k)
    a = torch.randn(16, k, generator=g).to(torch.bfloat16).to(device)
    b = torch.randn(k, 16, generator=g).to(torch.bfloat16).to(device)
    c = torch.empty(16, 16, device=device)
    _, dot = _kernels()
    dot[(1,)](a, b, c, M=16, K=k, N=16)
    exact = a.double() @ b.double()
    bound = k * 2.0**-23 * (a.double().abs() @ b.double().abs())
    assert ((c.double() - exact).abs() <= bound).all()
