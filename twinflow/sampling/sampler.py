"""The unified any-step sampler (ALGORITHM.md §4; UCGM's sampler as used by TwinFlow).

One loop covers one-step, few-step, any-step and multi-step sampling of a model ``F(x_t, t, tt, cond)``
trained on the linear path ``x_t = t*z + (1 - t)*x``. Each step asks the model for a jump from the
current time to a target time (0, the next grid time, or the current time), inverts the prediction to
a clean estimate ``x_hat`` and a noise estimate ``z_hat``, and re-noises to the next grid time, mixing
in fresh noise with ratio ``rho``. Order 2 adds a Heun-like corrector on the noise estimate.

Numerics. The model sees ``x`` in the noise's dtype; the sampler's own state, the guidance combination
and the re-noising are kept in ``promote(noise dtype, float32)`` (the reference keeps float64), and times
are handed to the model as float32 tensors (float64 for float64 noise) rather than in the noise's dtype:
a bf16 time would round 0.999 to 1.0. The returned tensors are in the noise's dtype.

Classifier-free guidance. When ``cfg_scale > 0`` and a call's current time ``t`` lies in the closed
interval ``cfg_interval = [lo, hi]`` (t on the noise-level axis, 1 = noise; this is the reference's
convention, where the test sits in the network's forward and therefore applies to every call, the
order-2 corrector included, with that call's own t), the conditional and unconditional rows run as ONE
batched forward of ``2B`` rows and the velocity is ``F_u + cfg_scale * (F_c - F_u)``. Outside the
interval only the conditional rows run.

Relation to the reference code (same results unless noted): its order-2 corrector call has no target
time and crashes (here: ``tt = t_next``, ALGORITHM.md's [deviation]); with ``g1 = 0`` it also runs the
corrector on the last step, whose result it then discards (here: skipped, one call fewer, same
output); in ``"SDE"`` mode it overwrites the ratio setting with the first step's value, so later steps
reuse it (here: ``rho_i`` per step, as §4 specifies).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from twinflow.method.conditioning import cat_conditions

from .config import SamplerConfig
from .schedule import noise_ratio

Backbone = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclasses.dataclass
class SampleResult:
    """What :func:`sample` returns.

    ``sample`` is the last clean estimate ``x_hat`` (as in the reference, the estimate recorded before
    extrapolation). ``intermediates`` holds every step's ``x_hat`` in order (the last one is ``sample``;
    empty when intermediates are not kept). ``times`` is the grid the model was called on.

    Cost accounting: ``nfe`` counts backbone forwards (model calls). A guided call runs the conditional
    and unconditional rows in one forward, so it counts once in ``nfe`` and once more in
    ``guided_nfe``; ``batch_forwards = nfe + guided_nfe`` is the cost in forwards of ``B`` rows.
    """

    sample: torch.Tensor
    intermediates: list[torch.Tensor]
    times: torch.Tensor
    nfe: int
    guided_nfe: int

    @property
    def batch_forwards(self) -> int:
        return self.nfe + self.guided_nfe


def _check_condition_batch(name: str, cond: Any, batch: int) -> None:
    """Catch the common mistake of a tensor condition whose batch differs from the noise's."""
    if isinstance(cond, torch.Tensor):
        if cond.dim() == 0 or cond.shape[0] != batch:
            raise ValueError(
                f"{name} has shape {tuple(cond.shape)}; its first dimension must equal the noise batch {batch}"
            )
    elif isinstance(cond, (list, tuple)):
        for i, part in enumerate(cond):
            _check_condition_batch(f"{name}[{i}]", part, batch)
    elif hasattr(cond, "index") and hasattr(cond, "__len__") and len(cond) != batch:
        raise ValueError(f"{name} holds {len(cond)} rows; it must hold one per noise row ({batch})")


class _Velocity:
    """Evaluates the backbone (with guidance where configured) and counts the calls."""

    def __init__(self, model: Backbone, cond: Any, uncond: Any, config: SamplerConfig,
                 time_dtype: torch.dtype, model_dtype: torch.dtype, state_dtype: torch.dtype):
        self.model = model
        self.cond = cond
        self.scale = config.cfg_scale
        self.interval = config.cfg_interval
        self.guided_cond = cat_conditions([cond, uncond]) if self.scale > 0 else None
        self.time_dtype = time_dtype
        self.model_dtype = model_dtype
        self.state_dtype = state_dtype
        self.nfe = 0
        self.guided_nfe = 0

    def __call__(self, x: torch.Tensor, t: float, tt: float) -> torch.Tensor:
        batch = x.shape[0]
        guided = self.scale > 0 and self.interval[0] <= t <= self.interval[1]
        x_in = x.to(self.model_dtype)
        cond = self.cond
        if guided:
            x_in = torch.cat([x_in, x_in])
            cond = self.guided_cond
        rows = x_in.shape[0]
        t_in = torch.full((rows,), t, dtype=self.time_dtype, device=x.device)
        tt_in = torch.full((rows,), tt, dtype=self.time_dtype, device=x.device)
        out = self.model(x_in, t_in, tt_in, cond)
        if not isinstance(out, torch.Tensor) or out.shape != x_in.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the backbone returned {got} for an input of shape {tuple(x_in.shape)}; it must return the input's shape"
            )
        self.nfe += 1
        out = out.to(self.state_dtype)
        if not guided:
            return out
        self.guided_nfe += 1
        v_cond, v_uncond = out[:batch], out[batch:]
        return v_uncond + self.scale * (v_cond - v_uncond)


@torch.no_grad()
def sample(
    model: Backbone,
    noise: torch.Tensor,
    cond: Any = None,
    uncond: Any = None,
    *,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    progress: bool = False,
    keep_intermediates: bool = True,
) -> SampleResult:
    """Generate from ``noise`` (pure noise at t = 1, batch first) with ``model(x, t, tt, cond)``.

    ``cond``/``uncond`` are conditions in the sense of :mod:`twinflow.method.conditioning`; ``uncond``
    is needed only for guidance (``config.cfg_scale > 0``). Fresh noise (``stochast_ratio > 0`` or
    ``"SDE"``) is drawn from ``generator`` (which must live on the noise's device), so a seeded generator
    makes the result reproducible. ``keep_intermediates=False`` keeps only the final sample (saves
    memory for large images).
    """
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
    if not noise.is_floating_point() or noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(
            "noise must be a floating-point tensor with a non-empty batch dimension first, "
            f"got a {noise.dtype} tensor of shape {tuple(noise.shape)}"
        )
    batch = noise.shape[0]
    _check_condition_batch("cond", cond, batch)
    if config.cfg_scale > 0:
        if cond is None or uncond is None:
            raise ValueError("cfg_scale > 0 needs both cond and uncond (set cfg_scale: 0 to sample without guidance)")
        _check_condition_batch("uncond", uncond, batch)

    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    time_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    times = config.time_grid().to(time_dtype)
    grid = times.tolist()
    velocity = _Velocity(model, cond, uncond, config, time_dtype, noise.dtype, state_dtype)
    n = len(grid) - 1
    eps = config.extrapol_ratio

    x_cur = noise.to(state_dtype)
    intermediates: list[torch.Tensor] = []
    prev_x_hat = prev_z_hat = None
    for i in tqdm(range(n), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = grid[i], grid[i + 1]
        target = {"few": 0.0, "any": t_next, "mul": t_cur}[config.sampling_style]
        v = velocity(x_cur, t_cur, target)
        x_hat = x_cur - t_cur * v
        z_hat = x_cur + (1.0 - t_cur) * v
        if keep_intermediates or i == n - 1:
            intermediates.append(x_hat.to(noise.dtype))

        if eps > 0:
            raw_x_hat, raw_z_hat = x_hat, z_hat
            if i >= 2:  # the reference extrapolates from the third step on, against the previous raw estimate
                x_hat = x_hat + eps * (x_hat - prev_x_hat)
                z_hat = z_hat + eps * (z_hat - prev_z_hat)
            prev_x_hat, prev_z_hat = raw_x_hat, raw_z_hat

        rho = noise_ratio(config.stochast_ratio, t_cur, t_next)
        if rho > 0 and t_next > 0:
            fresh = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=state_dtype)
            z_mix = math.sqrt(1.0 - rho) * z_hat + math.sqrt(rho) * fresh
        else:
            z_mix = z_hat
        x_next = (1.0 - t_next) * x_hat + t_next * z_mix

        if config.sampling_order == 2 and i < n - 1:
            # Heun-like corrector on the noise estimate, with the instantaneous velocity at t_next
            # ([deviation] from the reference, whose corrector call has no target time and crashes).
            v_next = velocity(x_next, t_next, t_next)
            z_avg = 0.5 * (z_hat + x_next + (1.0 - t_next) * v_next)
            keep = (1.0 - t_next) / (1.0 - t_cur)
            x_next = keep * x_cur + (t_next - keep * t_cur) * z_avg
        x_cur = x_next

    return SampleResult(
        sample=intermediates[-1],
        intermediates=intermediates if keep_intermediates else [],
        times=times,
        nfe=velocity.nfe,
        guided_nfe=velocity.guided_nfe,
    )
