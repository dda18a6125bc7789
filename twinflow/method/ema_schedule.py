"""The teacher EMA's decay schedule (ALGORITHM.md §3.5).

A running decay ``d`` starts at 0. Each update uses the current ``d`` (``ema <- d*ema + (1-d)*theta``)
and then moves it towards the target: ``d <- d + (1 - d) * (target - d) / 2``. The first update
therefore copies the online weights. Updated once per optimizer step.
"""
from __future__ import annotations


class EMADecaySchedule:
    def __init__(self, target: float):
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"ema_decay_rate must lie in [0, 1], got {target}")
        self.target = float(target)
        self.decay = 0.0
        self.num_updates = 0

    def next_decay(self) -> float:
        """The decay to use for this update; advances the schedule."""
        d = self.decay
        self.decay = d + (1.0 - d) * (self.target - d) / 2.0
        self.num_updates += 1
        return d

    def state_dict(self) -> dict:
        return {"target": self.target, "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        if abs(float(state["target"]) - self.target) > 0:
            raise ValueError(
                f"EMA schedule in checkpoint targets {state['target']}, config says ema_decay_rate={self.target}"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
