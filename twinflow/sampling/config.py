"""Typed settings of the unified any-step sampler, with the reference's key names and presets.

The key names are the reference's (``sampling_steps``, ``stochast_ratio``, ``rfba_gap_steps``, ...)
so a sampling section written for the reference loads unchanged. Every value is checked when the config
is built, including the time grid it implies, so that a bad setting fails at load time with the
offending key in the message instead of producing NaNs mid-sampling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Union

import torch

from twinflow.utils.typed_config import ConfigError, from_dict

from .schedule import num_intervals, time_grid

SamplingStyle = Literal["few", "any", "mul"]
_STYLES = ("few", "any", "mul")

# The reference's sampling settings (README / example configs), reachable by name instead of by editing
# YAML. "few"/"any"/"multi" are the training repository's examples; "published_*" are the settings the
# TwinFlow-Qwen-Image release recommends (which leave sampling_style at its default, "few").
SAMPLER_PRESETS: dict[str, dict[str, Any]] = {
    "few_step": dict(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.7), sampling_style="few"),
    "one_step": dict(sampling_steps=1, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.7), sampling_style="few"),
    "any_step": dict(sampling_steps=4, stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.5), sampling_style="any"),
    "multi_step": dict(
        sampling_steps=30,
        stochast_ratio=0.0,
        time_dist_ctrl=(1.17, 0.8, 1.1),
        rfba_gap_steps=(0.001, 0.0),
        sampling_style="mul",
    ),
    "published_2nfe": dict(sampling_steps=2, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.6), sampling_style="few"),
    "published_4nfe": dict(sampling_steps=4, stochast_ratio=1.0, rfba_gap_steps=(0.001, 0.5), sampling_style="few"),
}


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"sampler config key '{key}': expected a finite number, got {value!r}")
    return float(value)


def _numbers(key: str, value: Any, count: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ConfigError(f"sampler config key '{key}': expected a list of {count} numbers, got {value!r}")
    return tuple(_number(f"{key}[{i}]", v) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Settings of :func:`twinflow.sampling.sample` (ALGORITHM.md §4).

    Defaults are the published 2-NFE setting of TwinFlow-Qwen-Image.

    * ``sampling_steps`` S >= 1; ``sampling_order`` 1 or 2 (order 2 runs ``(S + 1) // 2`` intervals,
      each but the last with a corrector call). The corrector re-forms the state with a factor
      ``1 / (1 - t_cur)``: it is second-order accurate but amplifies errors on steps that start next to
      t = 1, so with ``g0 = 0.001`` it pays off only on fine grids (tens of intervals).
    * ``stochast_ratio`` rho in [0, 1], or ``"SDE"`` for the per-step ratio of §4.
    * ``extrapol_ratio`` eps >= 0 (0 = off).
    * ``time_dist_ctrl`` [a, b, c] > 0: Kumaraswamy warp of the grid.
    * ``rfba_gap_steps`` [g0, g1] >= 0 with g0 + g1 < 1: gaps at the noise and data ends of the grid.
    * ``sampling_style``: the target time of each call: ``few`` 0, ``any`` t_next, ``mul`` t_cur.
    * ``cfg_scale`` >= 0 (0 = no guidance) and ``cfg_interval`` [lo, hi] within [0, 1]: guidance is
      applied to a model call whose current time t satisfies lo <= t <= hi (t = 1 is noise).
    """

    sampling_steps: int = 2
    sampling_order: int = 1
    stochast_ratio: Union[float, Literal["SDE"]] = 1.0
    extrapol_ratio: float = 0.0
    # Variable-length tuple types: the lengths are checked in __post_init__ with a message naming the key.
    time_dist_ctrl: tuple[float, ...] = (1.0, 1.0, 1.0)
    rfba_gap_steps: tuple[float, ...] = (0.001, 0.6)
    sampling_style: SamplingStyle = "few"
    cfg_scale: float = 0.0
    cfg_interval: tuple[float, ...] = (0.0, 1.0)

    def __post_init__(self) -> None:
        steps = self.sampling_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sampler config key 'sampling_steps': expected an integer >= 1, got {steps!r}")
        if isinstance(self.sampling_order, bool) or self.sampling_order not in (1, 2):
            raise ConfigError(
                f"sampler config key 'sampling_order': expected 1 or 2, got {self.sampling_order!r}"
            )
        if self.sampling_style not in _STYLES:
            raise ConfigError(
                f"sampler config key 'sampling_style': expected one of {list(_STYLES)}, got {self.sampling_style!r}"
            )

        rho = self.stochast_ratio
        if rho != "SDE":
            bad_rho = f"sampler config key 'stochast_ratio': expected a number in [0, 1] or 'SDE', got {rho!r}"
            if isinstance(rho, str):
                raise ConfigError(bad_rho)
            rho = _number("stochast_ratio", rho)
            if not 0.0 <= rho <= 1.0:
                raise ConfigError(bad_rho)
        extrapol = _number("extrapol_ratio", self.extrapol_ratio)
        if extrapol < 0:
            raise ConfigError(f"sampler config key 'extrapol_ratio': expected a number >= 0, got {extrapol!r}")

        warp = _numbers("time_dist_ctrl", self.time_dist_ctrl, 3)
        if min(warp) <= 0:
            raise ConfigError(f"sampler config key 'time_dist_ctrl': all of [a, b, c] must be > 0, got {list(warp)}")
        gaps = _numbers("rfba_gap_steps", self.rfba_gap_steps, 2)
        if min(gaps) < 0 or gaps[0] + gaps[1] >= 1:
            raise ConfigError(
                f"sampler config key 'rfba_gap_steps': need g0 >= 0, g1 >= 0 and g0 + g1 < 1, got {list(gaps)}"
            )

        scale = _number("cfg_scale", self.cfg_scale)
        if scale < 0:
            raise ConfigError(f"sampler config key 'cfg_scale': expected a number >= 0 (0 = off), got {scale!r}")
        interval = _numbers("cfg_interval", self.cfg_interval, 2)
        if not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ConfigError(f"sampler config key 'cfg_interval': need 0 <= lo <= hi <= 1, got {list(interval)}")

        for name, value in (
            ("stochast_ratio", rho),
            ("extrapol_ratio", extrapol),
            ("time_dist_ctrl", warp),
            ("rfba_gap_steps", gaps),
            ("cfg_scale", scale),
            ("cfg_interval", interval),
        ):
            object.__setattr__(self, name, value)
        self._check_grid()

    def _check_grid(self) -> None:
        """The grid must decrease strictly in float32 (the coarsest time precision the sampler uses),
        and order 2 must not correct a step that starts at t = 1, where its update divides by 1 - t."""
        times = self.time_grid().to(torch.float32)
        if not bool((times[1:] < times[:-1]).all()):
            raise ConfigError(
                f"sampler config keys 'time_dist_ctrl' / 'rfba_gap_steps': the time grid {times.tolist()} "
                "has repeated times in float32; use milder warp parameters or fewer steps"
            )
        if self.sampling_order == 2 and self.num_intervals > 1 and float(times[0]) >= 1.0:
            raise ConfigError(
                "sampler config key 'rfba_gap_steps': sampling_order 2 needs the first time below 1 "
                f"(its corrector divides by 1 - t_cur), got t_0 = {float(times[0])}; use g0 > 0 such as 0.001"
            )

    @property
    def num_intervals(self) -> int:
        """Grid intervals (= predictor calls)."""
        return num_intervals(self.sampling_steps, self.sampling_order)

    @property
    def expected_nfe(self) -> int:
        """Backbone calls one :func:`sample` makes: a predictor per interval plus, for order 2, a
        corrector on every interval but the last."""
        n = self.num_intervals
        return 2 * n - 1 if self.sampling_order == 2 else n

    def time_grid(self) -> torch.Tensor:
        """The decreasing float64 times ``[t_0, ..., 0]`` this config samples on."""
        return time_grid(self.sampling_steps, self.sampling_order, self.time_dist_ctrl, self.rfba_gap_steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplerConfig:
        """Strict load from plain data (e.g. a YAML section); unknown keys are errors."""
        return from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SamplerConfig:
        """A named preset from :data:`SAMPLER_PRESETS`, optionally with some keys replaced."""
        if name not in SAMPLER_PRESETS:
            raise ConfigError(f"unknown sampler preset {name!r}; available presets: {sorted(SAMPLER_PRESETS)}")
        return from_dict(cls, {**SAMPLER_PRESETS[name], **overrides})
