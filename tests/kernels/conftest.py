"""Shared setup for the Triton kernel tests.

* Without a CUDA GPU, Triton kernels can only run through its CPU interpreter, which is chosen when a
  kernel is decorated: TRITON_INTERPRET=1 is set here, at conftest import, before the test modules
  import triton or ``twinflow.kernels``.
* The ``cuda`` marker: tests (or parameters) marked ``cuda`` run when a GPU is present and are skipped,
  with the reason, otherwise. The ``device`` fixture runs a test on the interpreter (CPU) and on CUDA.
* ``poisoned_allocations``: NaN-fills every tensor that ``torch.empty`` / ``torch.empty_like`` return
  while it is active, so an output element a kernel forgot to write fails the comparison instead of
  passing by luck with whatever memory held.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()
INTERPRETER_ON = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped, with the reason, when none is present)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a kernel test runs on: CPU through Triton's interpreter, and CUDA when present."""
    if request.param == "cpu" and not INTERPRETER_ON:
        pytest.skip("CPU kernel runs need TRITON_INTERPRET=1 (not set because a GPU is present)")
    return torch.device(request.param)


class PoisonRecord:
    """What a ``poisoned_allocations`` block did: ``count`` tensors were filled with poison."""

    def __init__(self) -> None:
        self.count = 0

    def poison(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool:
            tensor.fill_(torch.iinfo(tensor.dtype).max)
        self.count += 1
        return tensor


@contextlib.contextmanager
def _poisoned_allocations() -> Iterator[PoisonRecord]:
    record = PoisonRecord()
    real_empty, real_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *args, **kwargs: record.poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: record.poison(real_empty_like(*args, **kwargs))
    try:
        yield record
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@pytest.fixture
def poisoned_allocations():
    """A context manager factory: ``with poisoned_allocations() as record: out = kernel(...)``; kernel
    wrappers allocate their outputs with ``torch.empty``/``torch.empty_like``, so the outputs start as
    NaN. Assert ``record.count > 0`` to prove the poisoning reached the wrapper."""
    return _poisoned_allocations
