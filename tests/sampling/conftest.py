"""Closed-form Gaussian flows: exact test models for the sampler.

Data ``x ~ N(mu, Sigma)`` and noise ``z ~ N(0, I)`` on the path ``x_t = t z + (1 - t) x`` give Gaussian
marginals with mean ``m_t = (1 - t) mu`` and covariance ``C_t = (1 - t)^2 Sigma + t^2 I``.

Instantaneous velocity. ``x_t`` and ``z - x`` are jointly Gaussian with
``Cov(z - x, x_t) = t I - (1 - t) Sigma`` and ``E[z - x] = -mu``, so
``v(y, t) = E[z - x | x_t = y] = -mu + (t I - (1 - t) Sigma) C_t^{-1} (y - m_t)``.

Flow map. All ``C_t`` are functions of ``Sigma``, so they commute and share ``Sigma``'s eigenvectors.
With the symmetric square root ``S_t = C_t^{1/2}``, ``phi_{t->s}(y) = m_s + S_s S_t^{-1} (y - m_t)``
pushes ``N(m_t, C_t)`` to ``N(m_s, C_s)``, and it solves the probability-flow ODE ``dy/dt = v(y, t)``:
``d/ds phi = -mu + (dS_s/ds) S_t^{-1} (y - m_t)`` with ``dS_s/ds = S_s^{-1} (s I - (1 - s) Sigma)``
(differentiate ``S_s^2 = C_s`` using commutativity), which is ``v(phi, s)``. In Sigma's eigenbasis
everything is diagonal: eigenvalue ``lam`` gives ``S_t = sqrt((1 - t)^2 lam + t^2)``.

Average velocity. The exact jump from ``t`` to ``tt`` is ``u(y, t, tt) = (y - phi_{t->tt}(y)) / (t - tt)``
and ``u(y, t, t) = v(y, t)``; with it the inversion ``y - (t - tt) u`` lands exactly on the ODE solution.

Guidance. ``v`` and ``u`` are affine in ``mu`` with coefficients that do not depend on ``mu``; an
affine combination ``u_u + s (u_c - u_u)`` (weights summing to 1) is therefore the exact field of the
Gaussian with mean ``mu_u + s (mu_c - mu_u)`` and the same ``Sigma``.

The model takes per-row means as its condition (a ``(B, d)`` tensor; ``None`` = the default mean), works
in float64, records every call, and checks that it runs without autograd.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch


@dataclasses.dataclass
class Call:
    x: torch.Tensor
    t: torch.Tensor
    tt: torch.Tensor
    cond: torch.Tensor | None


class GaussianFlow:
    """Exact backbone ``F(x, t, tt, cond)`` for Gaussian data (instantaneous or average velocity)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, average: bool):
        self.mu = mu.double()
        self.sigma = sigma.double()
        self.lam, self.q = torch.linalg.eigh(self.sigma)
        self.average = average
        self.calls: list[Call] = []

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @property
    def sigma_sqrt(self) -> torch.Tensor:
        """The symmetric square root of Sigma (the exact t = 1 -> 0 flow map's matrix)."""
        return self.q @ torch.diag(self.lam.sqrt()) @ self.q.T

    def _std(self, t: torch.Tensor) -> torch.Tensor:
        """Per-eigendirection marginal standard deviation at times ``t`` of shape (B, 1)."""
        return torch.sqrt((1 - t) ** 2 * self.lam + t**2)

    def _means(self, cond: torch.Tensor | None, rows: int) -> torch.Tensor:
        return self.mu.expand(rows, -1) if cond is None else cond.double()

    def flow(self, y: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``phi_{t->s}(y)`` for rows ``y`` (B, d) and times ``t``, ``s`` of shape (B,)."""
        mu = self._means(cond, y.shape[0])
        t, s = t.double()[:, None], s.double()[:, None]
        coords = (y.double() - (1 - t) * mu) @ self.q
        return (1 - s) * mu + (self._std(s) / self._std(t) * coords) @ self.q.T

    def velocity(self, y: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``v(y, t)``, the exact instantaneous velocity."""
        mu = self._means(cond, y.shape[0])
        t = t.double()[:, None]
        coords = (y.double() - (1 - t) * mu) @ self.q
        gain = (t - (1 - t) * self.lam) / ((1 - t) ** 2 * self.lam + t**2)
        return -mu + (gain * coords) @ self.q.T

    def flow_map(self, t0: float, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` of the exact flow from ``t0`` to data, for the mean ``cond`` (a (d,) tensor) or mu."""

        def run(z: torch.Tensor) -> torch.Tensor:
            rows = z.shape[0]
            means = None if cond is None else cond.expand(rows, -1)
            start, end = torch.full((rows,), t0, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
            return self.flow(z, start, end, means)

        return affine_map(run, self.dim)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "the sampler must call the model under torch.no_grad()"
        assert t.shape == tt.shape == (x.shape[0],), (t.shape, tt.shape, x.shape)
        self.calls.append(Call(x.clone(), t.clone(), tt.clone(), None if cond is None else cond.clone()))
        t_abs, tt_abs = t.abs(), tt.abs()
        v = self.velocity(x, t_abs, cond)
        if self.average:
            gap = (t_abs - tt_abs).double()[:, None]
            jump = (x.double() - self.flow(x, t_abs, tt_abs, cond)) / torch.where(gap == 0, 1.0, gap)
            v = torch.where(gap == 0, v, jump)
        return v.to(x.dtype)


MU = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
# Non-diagonal, well-conditioned, with eigenvalues spread over [0.3, 2.5] or so.
SIGMA = torch.tensor([[1.5, 0.6, -0.3], [0.6, 1.0, 0.4], [-0.3, 0.4, 0.8]], dtype=torch.float64)


@pytest.fixture
def exact_average() -> GaussianFlow:
    """A perfect any-step model: exact average velocity between any two times."""
    return GaussianFlow(MU, SIGMA, average=True)


@pytest.fixture
def exact_velocity() -> GaussianFlow:
    """A perfect flow-matching model: exact instantaneous velocity, target time ignored."""
    return GaussianFlow(MU, SIGMA, average=False)


def affine_map(run: Callable[[torch.Tensor], torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` of a deterministic map ``noise -> A noise + b`` (rows), probed with 0 and the basis.

    Deterministic sampling of a Gaussian model is affine in the noise, so this gives the sampler's
    output distribution ``N(b, A A^T)`` exactly, without Monte-Carlo error.
    """
    probe = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)])
    out = run(probe)
    b = out[0]
    return (out[1:] - b).T, b


@pytest.fixture
def probe_affine() -> Callable[[Callable[[torch.Tensor], torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`affine_map`, for tests (test modules do not import from conftest)."""
    return affine_map
