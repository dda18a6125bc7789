"""The sampler's bookkeeping: grid, noise ratio, call sequence and NFE, extrapolation, randomness,
dtypes, and configuration errors. Exact values here are computed by hand from ALGORITHM.md §4."""
from __future__ import annotations

import pytest
import torch

from twinflow.sampling import SAMPLER_PRESETS, SamplerConfig, kumaraswamy_warp, noise_ratio, sample
from twinflow.utils.typed_config import ConfigError


def config(**kw) -> SamplerConfig:
    return SamplerConfig.from_dict(kw)


# --- time grid -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "settings, expected",
    [
        # g1 > 0: u = linspace(g0, 1 - g1, n); t = 1 - u, then 0.
        (dict(sampling_steps=2, rfba_gap_steps=[0.001, 0.7]), [0.999, 0.7, 0.0]),
        (dict(sampling_steps=1, rfba_gap_steps=[0.001, 0.7]), [0.999, 0.0]),
        (dict(sampling_steps=4, rfba_gap_steps=[0.001, 0.5]), [0.999, 1 - (0.001 + 0.499 / 3), 1 - (0.001 + 0.998 / 3), 0.5, 0.0]),
        # g1 = 0: u = linspace(g0, 1, n + 1) without the last point.
        (dict(sampling_steps=4, rfba_gap_steps=[0.0, 0.0]), [1.0, 0.75, 0.5, 0.25, 0.0]),
        # Order 2: n = (S + 1) // 2 intervals.
        (dict(sampling_steps=5, sampling_order=2, rfba_gap_steps=[0.1, 0.0]), [0.9, 0.6, 0.3, 0.0]),
        (dict(sampling_steps=6, sampling_order=2, rfba_gap_steps=[0.1, 0.0]), [0.9, 0.6, 0.3, 0.0]),
        # Kumaraswamy warp u -> (1 - (1 - u^a)^b)^c on u = [0, 1/4, 1/2, 3/4].
        (dict(sampling_steps=4, rfba_gap_steps=[0.0, 0.0], time_dist_ctrl=[2, 1, 1]), [1.0, 0.9375, 0.75, 0.4375, 0.0]),
        (dict(sampling_steps=4, rfba_gap_steps=[0.0, 0.0], time_dist_ctrl=[1, 2, 1]), [1.0, 0.5625, 0.25, 0.0625, 0.0]),
        (dict(sampling_steps=4, rfba_gap_steps=[0.0, 0.0], time_dist_ctrl=[1, 1, 2]), [1.0, 0.9375, 0.75, 0.4375, 0.0]),
    ],
)
def test_time_grid_values(settings, expected):
    grid = config(**settings).time_grid()
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_kumaraswamy_warp_fixes_the_ends_and_is_monotone():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for abc in ([1.17, 0.8, 1.1], [0.5, 3.0, 2.0]):
        w = kumaraswamy_warp(u, *abc)
        assert w[0] == 0 and w[-1] == 1
        assert (w[1:] > w[:-1]).all()
    torch.testing.assert_close(kumaraswamy_warp(u, 1, 1, 1), u, rtol=0, atol=1e-15)


def test_multi_step_preset_grid_starts_near_one_and_is_strictly_decreasing():
    grid = SamplerConfig.preset("multi_step").time_grid()
    assert grid.shape == (31,)
    u0 = (1 - (1 - 0.001**1.17) ** 0.8) ** 1.1  # hand-evaluated warp of g0
    assert grid[0].item() == pytest.approx(1 - u0, abs=1e-15)
    assert grid[-1] == 0 and (grid[1:] < grid[:-1]).all()


# --- noise ratio -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "t_cur, t_next, expected",
    [
        (0.3, 0.25, 0.05 * 2 * 0.3 / 0.0625),  # 0.48
        (0.5, 0.45, 0.05 * 2 * 0.5 / 0.45**2),
        (1.0, 0.5, 1.0),  # 4, clamped
        (0.999, 0.0, 1.0),  # the formula's limit at t_next = 0, no division
        (0.5, 1e-200, 1.0),  # t_next^2 underflows to 0: still no division by zero
    ],
)
def test_sde_noise_ratio(t_cur, t_next, expected):
    assert noise_ratio("SDE", t_cur, t_next) == pytest.approx(expected, rel=1e-12)


def test_numeric_noise_ratio_is_used_as_is():
    assert noise_ratio(0.3, 0.9, 0.0) == 0.3


# --- call sequence, NFE and guidance accounting ---------------------------------------------------

class Recorder:
    """A linear backbone that records what it is called with (times, rows, condition)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]] = []

    def __call__(self, x, t, tt, cond):
        assert not torch.is_grad_enabled()
        self.calls.append((x.clone(), t.clone(), tt.clone(), cond))
        return 0.5 * x - 0.1 * (t - tt).view(-1, *[1] * (x.dim() - 1)) + (0 if cond is None else cond.mean())


def _expected_nfe(steps: int, order: int) -> int:
    n = (steps + 1) // 2 if order == 2 else steps
    return n if order == 1 else 2 * n - 1


@pytest.mark.parametrize("style", ["few", "any", "mul"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("guidance", [None, (0.0, 1.0), (0.0, 0.6)])
def test_call_sequence_times_and_nfe(style, order, steps, guidance):
    cfg = config(
        sampling_steps=steps, sampling_order=order, sampling_style=style, stochast_ratio=0.5,
        rfba_gap_steps=[0.001, 0.0], cfg_scale=0.0 if guidance is None else 2.0, cfg_interval=list(guidance or (0.0, 1.0)),
    )
    model, rows = Recorder(), 3
    noise = torch.randn(rows, 2, 4, 4)
    cond = torch.ones(rows, 5) if guidance else None
    uncond = torch.zeros(rows, 5) if guidance else None
    result = sample(model, noise, cond, uncond, config=cfg, generator=torch.Generator().manual_seed(0))

    assert result.nfe == len(model.calls) == _expected_nfe(steps, order) == cfg.expected_nfe
    grid = result.times.tolist()
    n = len(grid) - 1
    expected = []  # (t, tt) of each call
    for i in range(n):
        target = {"few": 0.0, "any": grid[i + 1], "mul": grid[i]}[style]
        expected.append((grid[i], target))
        if order == 2 and i < n - 1:
            expected.append((grid[i + 1], grid[i + 1]))  # corrector: instantaneous velocity at t_next
    guided = 0
    for (x, t, tt, c), (t_exp, tt_exp) in zip(model.calls, expected):
        is_guided = guidance is not None and guidance[0] <= t_exp <= guidance[1]
        guided += is_guided
        assert x.shape == ((2 * rows,) if is_guided else (rows,)) + noise.shape[1:]
        assert t.dtype == tt.dtype == torch.float32
        assert torch.all(t == t_exp) and torch.all(tt == tt_exp)
        if is_guided:
            assert torch.equal(c, torch.cat([cond, uncond]))
        else:
            assert c is cond
    assert result.guided_nfe == guided
    assert result.batch_forwards == result.nfe + guided
    assert len(result.intermediates) == n and result.sample is result.intermediates[-1]


def test_guidance_interval_applies_to_corrector_calls_with_their_own_time():
    # Grid [0.9, 0.6, 0.3, 0]; calls P(0.9) C(0.6) P(0.6) C(0.3) P(0.3); interval [0.5, 0.7].
    cfg = config(sampling_steps=5, sampling_order=2, rfba_gap_steps=[0.1, 0.0], stochast_ratio=0.0,
                 sampling_style="mul", cfg_scale=1.5, cfg_interval=[0.5, 0.7])
    model = Recorder()
    sample(model, torch.randn(2, 3), torch.ones(2, 1), torch.zeros(2, 1), config=cfg)
    assert [round(c[1][0].item(), 6) for c in model.calls] == [0.9, 0.6, 0.6, 0.3, 0.3]
    assert [c[0].shape[0] for c in model.calls] == [2, 4, 4, 2, 2]


# --- extrapolation -----------------------------------------------------------------------------------

def test_extrapolation_acts_from_the_third_step_against_the_previous_raw_estimate(exact_velocity):
    m = exact_velocity
    rows, eps = 5, 0.5
    noise = torch.randn(rows, m.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base = dict(sampling_steps=5, rfba_gap_steps=[0.0, 0.0], sampling_style="mul", stochast_ratio=0.0)  # 1, .8, .6, .4, .2, 0
    plain = sample(m, noise, config=config(**base)).intermediates
    m.calls.clear()
    extra = sample(m, noise, config=config(**base, extrapol_ratio=eps)).intermediates
    for k in range(3):
        assert torch.equal(plain[k], extra[k])
    assert (plain[3] - extra[3]).abs().max() > 1e-3

    # Each later call's input is the re-noised extrapolation of the previous step's raw estimates
    # against the raw estimates of the step before.
    raw = []
    for call in m.calls:
        t = call.t[0].item()
        v = m.velocity(call.x, call.t)
        raw.append((call.x - t * v, call.x + (1 - t) * v))
    for k in (3, 4):
        (x_prev, z_prev), (x_cur, z_cur) = raw[k - 2], raw[k - 1]
        t_k = m.calls[k].t[0].item()
        x_hat, z_hat = x_cur + eps * (x_cur - x_prev), z_cur + eps * (z_cur - z_prev)
        torch.testing.assert_close(m.calls[k].x, (1 - t_k) * x_hat + t_k * z_hat, rtol=0, atol=1e-12)


def test_extrapolation_on_the_last_step_does_not_change_the_returned_estimate(exact_velocity):
    """As in the reference, the returned sample is the last x_hat recorded before extrapolation."""
    noise = torch.randn(4, exact_velocity.dim, dtype=torch.float64)
    base = dict(sampling_steps=3, rfba_gap_steps=[0.0, 0.0], sampling_style="mul", stochast_ratio=0.0)
    a = sample(exact_velocity, noise, config=config(**base)).sample
    b = sample(exact_velocity, noise, config=config(**base, extrapol_ratio=0.7)).sample
    assert torch.equal(a, b)


# --- randomness, dtypes, stability -------------------------------------------------------------------

def test_seeded_generator_reproduces_and_different_seeds_differ(exact_average):
    cfg = SamplerConfig.preset("published_4nfe")
    noise = torch.randn(6, exact_average.dim, dtype=torch.float64)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        return sample(exact_average, noise, config=cfg, generator=torch.Generator().manual_seed(seed)).sample

    assert torch.equal(run(0), run(0))
    assert (run(0) - run(1)).abs().max() > 1e-3


def test_deterministic_settings_ignore_the_generator(exact_average):
    cfg = SamplerConfig.preset("any_step")
    noise = torch.randn(3, exact_average.dim, dtype=torch.float64)
    a = sample(exact_average, noise, config=cfg, generator=torch.Generator().manual_seed(0)).sample
    b = sample(exact_average, noise, config=cfg, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(a, b)


def test_bfloat16_noise_gives_bfloat16_inputs_float32_times_and_bfloat16_outputs(exact_velocity):
    cfg = SamplerConfig.preset("multi_step", sampling_steps=6)
    noise = torch.randn(4, exact_velocity.dim).to(torch.bfloat16)
    result = sample(exact_velocity, noise, config=cfg, generator=torch.Generator().manual_seed(0))
    assert result.sample.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in result.intermediates)
    assert all(c.x.dtype == torch.bfloat16 and c.t.dtype == torch.float32 for c in exact_velocity.calls)
    assert exact_velocity.calls[0].t[0].item() == pytest.approx(float(cfg.time_grid()[0]), abs=1e-7)  # not rounded to bf16


def test_bfloat16_sampling_accumulates_in_float32(exact_velocity):
    """The state is kept in float32 across steps, so 30 bf16 steps end within bf16 rounding of the
    float64 result (a bf16 state would accumulate a rounding error per step)."""
    noise = torch.randn(2000, exact_velocity.dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cfg = SamplerConfig.preset("multi_step")
    reference = sample(exact_velocity, noise.double(), config=cfg).sample
    out = sample(exact_velocity, noise, config=cfg).sample.double()
    rounding = (reference.to(torch.bfloat16).double() - reference).abs()
    err = (out - reference).abs()
    assert err.max() <= 1.5 * rounding.max() and err.mean() <= 1.5 * rounding.mean(), (err.max(), rounding.max(), err.mean(), rounding.mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "settings",
    [
        dict(sampling_steps=1, rfba_gap_steps=[0.0, 0.0]),
        dict(sampling_steps=2, rfba_gap_steps=[0.0, 0.7]),
        dict(sampling_steps=4, rfba_gap_steps=[0.001, 0.5], sampling_style="any"),
        dict(sampling_steps=30, rfba_gap_steps=[0.001, 0.0], sampling_style="mul", time_dist_ctrl=[1.17, 0.8, 1.1]),
        dict(sampling_steps=9, sampling_order=2, rfba_gap_steps=[0.001, 0.0], sampling_style="mul"),
    ],
)
def test_sde_mode_stays_finite(exact_average, dtype, settings):
    noise = torch.randn(8, exact_average.dim).to(dtype)
    result = sample(exact_average, noise, config=config(stochast_ratio="SDE", **settings), generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(x.float()).all() for x in result.intermediates)


def test_partial_noise_ratio_mixes_noise_estimate_and_fresh_noise_by_square_roots(exact_average):
    """Grid [1, 0.5, 0], rho = 0.36: the second call's input is
    x_1 = 0.5 x_hat + 0.5 (0.8 z_hat + 0.6 n), with x_hat = mu + Sigma^(1/2) z exact and z_hat = z, so
    x_1 has mean 0.5 mu and covariance (0.5 Sigma^(1/2) + 0.4 I)^2 + 0.09 I (Monte Carlo check)."""
    m = exact_average
    n = 50_000
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(n, m.dim, dtype=torch.float64, generator=gen)
    cfg = config(sampling_steps=2, rfba_gap_steps=[0.0, 0.5], sampling_style="few", stochast_ratio=0.36)
    sample(m, noise, config=cfg, generator=gen)
    x1 = m.calls[1].x
    eye = torch.eye(m.dim, dtype=torch.float64)
    mix = 0.5 * m.sigma_sqrt + 0.4 * eye
    cov = mix @ mix + 0.09 * eye
    diag = torch.diag(cov)
    tol = 6 * torch.sqrt((diag[:, None] * diag[None, :] + cov**2) / n)
    assert ((x1.mean(0) - 0.5 * m.mu).abs() < 6 * torch.sqrt(diag / n)).all()
    assert ((torch.cov(x1.T) - cov).abs() < tol).all(), (torch.cov(x1.T), cov)


def test_sde_ratio_follows_the_grid(exact_average):
    """Grid [1, 0.5, 0]: rho_0 = clamp(0.5 * 2 * 1 / 0.25) = 1, so SDE equals rho = 1 draw for draw;
    grid [1, .75, .5, .25, 0]: rho_0 = 0.25 * 2 / 0.5625 < 1, so SDE differs from rho = 1."""
    noise = torch.randn(4, exact_average.dim, dtype=torch.float64)

    def run(steps: int, rho) -> torch.Tensor:
        cfg = config(sampling_steps=steps, rfba_gap_steps=[0.0, 0.0], sampling_style="any", stochast_ratio=rho)
        return sample(exact_average, noise, config=cfg, generator=torch.Generator().manual_seed(5)).sample

    assert torch.equal(run(2, "SDE"), run(2, 1.0))
    assert (run(4, "SDE") - run(4, 1.0)).abs().max() > 1e-3


def test_keep_intermediates_false_keeps_only_the_sample(exact_average):
    noise = torch.randn(2, exact_average.dim, dtype=torch.float64)
    cfg = SamplerConfig.preset("any_step")
    full = sample(exact_average, noise, config=cfg)
    lean = sample(exact_average, noise, config=cfg, keep_intermediates=False)
    assert lean.intermediates == [] and torch.equal(lean.sample, full.sample)


# --- configuration -----------------------------------------------------------------------------------

def test_presets():
    expected = {
        "few_step": (2, 1.0, (0.001, 0.7), "few"),
        "one_step": (1, 1.0, (0.001, 0.7), "few"),
        "any_step": (4, 0.0, (0.001, 0.5), "any"),
        "multi_step": (30, 0.0, (0.001, 0.0), "mul"),
        "published_2nfe": (2, 1.0, (0.001, 0.6), "few"),
        "published_4nfe": (4, 1.0, (0.001, 0.5), "few"),
    }
    assert set(SAMPLER_PRESETS) == set(expected)
    for name, (steps, rho, gaps, style) in expected.items():
        cfg = SamplerConfig.preset(name)
        assert (cfg.sampling_steps, cfg.stochast_ratio, cfg.rfba_gap_steps, cfg.sampling_style) == (steps, rho, gaps, style)
    assert SamplerConfig.preset("multi_step").time_dist_ctrl == (1.17, 0.8, 1.1)
    assert SamplerConfig.preset("few_step", sampling_steps=3).sampling_steps == 3
    with pytest.raises(ConfigError, match="available presets"):
        SamplerConfig.preset("fast")


def test_config_round_trips_through_plain_data():
    from twinflow.utils.typed_config import to_dict

    cfg = config(stochast_ratio="SDE", sampling_steps=7, sampling_order=2, cfg_scale=4, cfg_interval=[0.1, 0.9])
    assert SamplerConfig.from_dict(to_dict(cfg)) == cfg
    assert cfg.cfg_scale == 4.0 and isinstance(cfg.cfg_scale, float)


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(sampling_steps=0), "sampling_steps"),
        (dict(sampling_steps=2.5), "sampling_steps"),
        (dict(sampling_order=3), "sampling_order"),
        (dict(stochast_ratio="ode"), "stochast_ratio"),
        (dict(stochast_ratio=1.5), "stochast_ratio"),
        (dict(extrapol_ratio=-0.1), "extrapol_ratio"),
        (dict(time_dist_ctrl=[1.0, 1.0]), "time_dist_ctrl"),
        (dict(time_dist_ctrl=[0.0, 1.0, 1.0]), "time_dist_ctrl"),
        (dict(rfba_gap_steps=[0.5, 0.5]), "rfba_gap_steps"),
        (dict(rfba_gap_steps=[-0.1, 0.0]), "rfba_gap_steps"),
        (dict(sampling_style="many"), "sampling_style"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(cfg_interval=[0.8, 0.2]), "cfg_interval"),
        (dict(cfg_interval=[0.0, 1.5]), "cfg_interval"),
        (dict(sampling_steps=4, sampling_order=2, rfba_gap_steps=[0.0, 0.0]), "rfba_gap_steps"),  # corrector at t = 1
        (dict(sampling_steps=200, time_dist_ctrl=[1.0, 1e-9, 1.0], rfba_gap_steps=[0.0, 0.0]), "time_dist_ctrl"),  # repeated times
        (dict(steps=4), "steps"),
    ],
)
def test_bad_configs_raise_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        SamplerConfig.from_dict(settings)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="'sampling_steps'"):
        SamplerConfig(sampling_steps=0)
    with pytest.raises(ConfigError, match="'stochast_ratio'"):
        SamplerConfig(stochast_ratio="sde")


def test_order_two_with_one_interval_may_start_at_one():
    assert SamplerConfig.from_dict(dict(sampling_steps=2, sampling_order=2, rfba_gap_steps=[0.0, 0.0])).expected_nfe == 1


# --- bad inputs ----------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = Recorder()
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs both cond and uncond"):
        sample(model, noise, torch.ones(2, 1), config=config(cfg_scale=2.0))
    with pytest.raises(ValueError, match=r"cond has shape \(3, 1\).*noise batch 2"):
        sample(model, noise, torch.ones(3, 1), config=config())
    with pytest.raises(ValueError, match=r"uncond\[0\] has shape"):
        sample(model, noise, (torch.ones(2, 1),), (torch.ones(1, 1),), config=config(cfg_scale=2.0))
    with pytest.raises(ValueError, match=r"returned \(2, 2\) for an input of shape \(2, 3\)"):
        sample(lambda x, t, tt, c: x[:, :2], noise, config=config())
    with pytest.raises(ValueError, match="floating-point tensor"):
        sample(model, torch.zeros(2, 3, dtype=torch.long), config=config())
    with pytest.raises(TypeError, match="SamplerConfig"):
        sample(model, noise, config={"sampling_steps": 2})
