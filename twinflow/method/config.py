"""Configuration of the TwinFlow objective (ALGORITHM.md §3), with the presets of its table.

Every key keeps the reference's name. A ``preset`` fills the keys the user leaves unset (:class:`Preset`
names those keys and holds each preset's values), so the reference's code edits ("comment these lines
for RCGM", "set these to 0 for flow matching") are configuration here: ``{preset: rcgm_practice}`` or
``{preset: flow_matching, dist_match_cof: 0.2}``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

GROUPS = ("e2e", "mul", "any", "adv", "one")


@dataclass
class GroupProbs:
    """Relative weights of the contiguous batch groups, in the order e2e, mul, any, adv, one."""

    e2e: float = 1.0
    mul: float = 1.0
    any: float = 1.0
    adv: float = 1.0
    one: float = 0.0

    def __post_init__(self) -> None:
        for name in GROUPS:
            if getattr(self, name) < 0:
                raise ValueError(f"probs.{name} must be >= 0, got {getattr(self, name)}")
        if sum(self.as_dict().values()) <= 0:
            raise ValueError("probs: at least one group must have a positive weight")

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in GROUPS}


@dataclass
class LossFuncConfig:
    """``loss_func_type`` of the reference: ``l2`` or ``barron_reweighting`` (alpha, c)."""

    type: Literal["l2", "barron_reweighting"] = "barron_reweighting"
    alpha: float = 1.0
    c: float = 1e-3

    def __post_init__(self) -> None:
        if self.c <= 0:
            raise ValueError(f"loss_func.c must be > 0, got {self.c}")


@dataclass(frozen=True)
class Preset:
    """The keys a ``method.preset`` decides, with their values. The field defaults are the ``twinflow``
    preset (the method of ALGORITHM.md §3); every other preset in :data:`PRESETS` names only what it
    changes. A key the user sets (YAML, override or keyword) wins over the preset."""

    probs: GroupProbs = field(default_factory=GroupProbs)
    consistc_ratio: float = 1.0
    enhanced_ratio: float = 0.5
    enhanced_range: tuple[float, float] = (0.0, 1.0)
    ema_decay_rate: float = 0.99
    time_dist_ctrl: tuple[float, float, float] = (1.0, 1.0, 1.0)
    estimate_order: int = 2
    dist_match_cof: float = 0.5
    use_image_free: bool = False


PRESETS: dict[str, Preset] = {
    "twinflow": Preset(),
    "rcgm_theory": Preset(probs=GroupProbs(e2e=0, mul=0, any=1, adv=0, one=0)),
    "rcgm_practice": Preset(probs=GroupProbs(e2e=1, mul=1, any=1, adv=0, one=0), dist_match_cof=0.0),
    "flow_matching": Preset(
        probs=GroupProbs(e2e=0, mul=1, any=0, adv=0, one=0), consistc_ratio=0.0, enhanced_ratio=0.0, estimate_order=0,
    ),
    "lora_1order": Preset(probs=GroupProbs(e2e=1, mul=1, any=0, adv=1, one=1), estimate_order=1),
}

FROM_PRESET = None
"""Default of every :class:`TwinFlowConfig` key that :class:`Preset` names: unset (or ``null``) means
"the preset's value"; ``__post_init__`` fills it in, so a loaded config holds no ``None`` there."""


@dataclass
class TwinFlowConfig:
    """Hyper-parameters of one TwinFlow training step. Keys left at :data:`FROM_PRESET` take the value of
    ``preset`` (see :class:`Preset` for the values); keys set explicitly win.

    Ranges (checked when the config is loaded; every number must also be finite): ``consistc_ratio``
    and ``ema_decay_rate`` in [0, 1]; ``enhanced_ratio`` (a guidance scale) and ``dist_match_cof`` >= 0;
    ``enhanced_range`` a time interval ``[low, high]`` inside [0, 1]; ``estimate_order`` >= 0; ``time_dist_ctrl``
    ``[a, b, s]`` with a, b > 0 and 0 < s <= 1; ``rcgm_delta`` in (0, 1).
    """

    preset: Literal["twinflow", "rcgm_theory", "rcgm_practice", "flow_matching", "lora_1order"] = "twinflow"
    consistc_ratio: Optional[float] = FROM_PRESET
    enhanced_ratio: Optional[float] = FROM_PRESET
    enhanced_range: Optional[tuple[float, float]] = FROM_PRESET
    ema_decay_rate: Optional[float] = FROM_PRESET
    time_dist_ctrl: Optional[tuple[float, float, float]] = FROM_PRESET
    estimate_order: Optional[int] = FROM_PRESET
    dist_match_cof: Optional[float] = FROM_PRESET
    use_image_free: Optional[bool] = FROM_PRESET
    probs: Optional[GroupProbs] = FROM_PRESET
    loss_func: LossFuncConfig = field(default_factory=LossFuncConfig)
    # Step of the finite difference in the RCGM target (ALGORITHM.md §3.7).
    rcgm_delta: float = 0.01
    # "triton" / "eager" / "auto": which implementation of the fused loss arithmetic runs.
    kernels: Literal["triton", "eager", "auto"] = "auto"

    def __post_init__(self) -> None:
        preset = PRESETS[self.preset]
        for key in (f.name for f in dataclasses.fields(Preset)):
            if getattr(self, key) is FROM_PRESET:
                value = getattr(preset, key)
                # The preset's GroupProbs is shared by every config of that preset: each gets a copy.
                setattr(self, key, dataclasses.replace(value) if dataclasses.is_dataclass(value) else value)
        self.enhanced_range = tuple(float(v) for v in self.enhanced_range)
        self.time_dist_ctrl = tuple(float(v) for v in self.time_dist_ctrl)
        self._validate()

    def _validate(self) -> None:
        if not 0.0 <= self.consistc_ratio <= 1.0:
            raise ValueError(f"consistc_ratio must lie in [0, 1], got {self.consistc_ratio}")
        if not self.enhanced_ratio >= 0.0:
            raise ValueError(f"enhanced_ratio must be >= 0, got {self.enhanced_ratio}")
        if not self.dist_match_cof >= 0.0:
            raise ValueError(f"dist_match_cof must be >= 0, got {self.dist_match_cof}")
        if not 0.0 <= self.ema_decay_rate <= 1.0:
            raise ValueError(f"ema_decay_rate must lie in [0, 1], got {self.ema_decay_rate}")
        if self.estimate_order < 0:
            raise ValueError(f"estimate_order must be >= 0, got {self.estimate_order}")
        a, b, s = self.time_dist_ctrl
        if a <= 0 or b <= 0 or not 0 < s <= 1:
            raise ValueError(f"time_dist_ctrl [a, b, s] needs a, b > 0 and 0 < s <= 1, got {list(self.time_dist_ctrl)}")
        r0, r1 = self.enhanced_range
        if not 0.0 <= r0 <= r1 <= 1.0:
            raise ValueError(
                f"enhanced_range must be a time interval [low, high] with 0 <= low <= high <= 1, got {list(self.enhanced_range)}"
            )
        if not 0 < self.rcgm_delta < 1:
            raise ValueError(f"rcgm_delta must lie in (0, 1), got {self.rcgm_delta}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TwinFlowConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(preset=name, **overrides)

    def replace(self, **changes) -> "TwinFlowConfig":
        return dataclasses.replace(self, **changes)
