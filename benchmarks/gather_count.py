"""Counts ZeRO-3 parameter all-gathers per optimizer step, per pass (instrumentation, no behaviour change).

Two levels, both installed by :class:`GatherCounter` on a live :class:`~.trainer.Trainer`:

* parameters: every partitioned parameter's ``all_gather_coalesced`` / ``all_gather`` (what DeepSpeed's
  parameter coordinator, ``GatheredParameters`` and the export call) is wrapped; each parameter that is
  actually fetched (status ``NOT_AVAILABLE`` at the call) counts one gather of ``ds_numel`` elements;
  a gather issued while the coordinator fetches a module that does not own the parameter is a
  *prefetch* (``prefetched``), the others are on-demand fetches;
* collectives: ``deepspeed.comm``'s backend ``all_gather_into_tensor`` / ``all_gather`` is wrapped; each
  call counts one collective and the bytes of its output (the gathered buffer, what every rank receives).

Passes are labelled by who runs them: a top-level forward of the backbone is named after the objective's
function on the Python stack (``adv_fake``, ``main``, ``guidance``, ``rcgm``, ``rectification``), the rest
after the trainer call in progress (``backward``, ``step``, ``ema``). Used by ``benchmarks/zero3_gathers.py``
and by the launcher tests (``tests/training/dist_worker.py``).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_PASS_OF_FUNCTION = {
    "one_step_sample": "adv_fake",
    "_guidance": "guidance",
    "_rcgm_integral": "rcgm",
    "_rectification": "rectification",
    "training_step": "main",
}


@dataclass
class StepGathers:
    """All-gathers of one optimizer step."""

    params: int = 0  # parameter gathers (one per parameter fetched)
    prefetched: int = 0  # of which issued ahead of their module (DeepSpeed's trace-driven prefetch)
    elements: int = 0  # elements of the gathered (full) parameters
    collectives: int = 0  # all-gather collectives issued
    bytes: int = 0  # bytes of the collectives' outputs
    forwards: int = 0  # top-level forwards of the backbone
    passes: list[str] = field(default_factory=list)  # the forwards' names, in order
    per_pass: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: Counter()))
    per_param: Counter = field(default_factory=Counter)  # ds_id -> gathers in this step

    def max_gathers_per_param(self) -> int:
        return max(self.per_param.values(), default=0)

    def summary(self) -> dict[str, Any]:
        return {
            "params": self.params, "prefetched": self.prefetched, "elements": self.elements, "collectives": self.collectives, "bytes": self.bytes,
            "forwards": self.forwards, "passes": list(self.passes),
            "max_gathers_per_param": self.max_gathers_per_param(),
            "per_pass": {k: dict(v) for k, v in self.per_pass.items()},
        }


def _pass_from_stack() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = _PASS_OF_FUNCTION.get(frame.f_code.co_name)
        if name is not None and frame.f_code.co_filename.endswith("objective.py"):
            return name
        frame = frame.f_back
    return "forward"


class GatherCounter:
    """Installs the counting wrappers on ``trainer`` (see the module doc); :meth:`step` collects one
    optimizer step. ``module`` (default ``trainer.backbone``) is the engine's partitioned module."""

    def __init__(self, trainer: Any, module: Any = None):
        import deepspeed.comm.comm as ds_comm

        self.trainer = trainer
        self.module = trainer.backbone if module is None else module
        self.numel = {p.ds_id: int(p.ds_numel) for p in self.module.parameters() if hasattr(p, "ds_id")}
        self.names = {p.ds_id: n for n, p in self.module.named_parameters() if hasattr(p, "ds_id")}
        self.total_numel = sum(self.numel.values())
        self.current: StepGathers | None = None
        self.phase = "other"
        self._undo: list[Callable[[], None]] = []
        for p in self.module.parameters():
            if hasattr(p, "ds_id"):
                for attr in ("all_gather_coalesced", "all_gather"):
                    self._wrap_param(p, attr)
        backend = ds_comm.cdb
        for attr in ("all_gather_into_tensor", "all_gather"):
            self._wrap_collective(backend, attr)
        self._fetching: set[int] | None = None  # ds_ids of the module being fetched by the coordinator
        coordinator = trainer.optimizer.parameter_offload.get_param_coordinator()
        self._wrap_fetch(coordinator)
        engine = trainer.engine
        self._wrap_phase(engine, "backward", "backward")
        self._wrap_phase(engine, "step", "step")
        self._wrap_phase(trainer.teacher, "update", "ema")
        # prepend: DeepSpeed's own pre-hooks already fetch (and prefetch) for this forward
        handle = self.module.register_forward_pre_hook(self._on_forward, prepend=True)
        self._undo.append(handle.remove)

    # --------------------------------------------------------------------------------- wrappers
    def _patch(self, obj: Any, attr: str, new: Callable) -> None:
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, new)

        def undo():
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)

        self._undo.append(undo)

    def _wrap_param(self, param: Any, attr: str) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        original = getattr(param, attr)

        def counted(param_list=None, *args, **kwargs):
            params = [param] if param_list is None else list(param_list)
            if self.current is not None:
                for p in params:
                    if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                        self.current.params += 1
                        self.current.elements += int(p.ds_numel)
                        self.current.per_param[p.ds_id] += 1
                        self.current.per_pass[self.phase]["params"] += 1
                        self.current.per_pass[self.phase]["elements"] += int(p.ds_numel)
                        if self._fetching is not None and p.ds_id not in self._fetching:
                            self.current.prefetched += 1
                            self.current.per_pass[self.phase]["prefetched"] += 1
            return original(param_list, *args, **kwargs) if param_list is not None else original(*args, **kwargs)

        self._patch(param, attr, counted)

    def _wrap_collective(self, backend: Any, attr: str) -> None:
        original = getattr(backend, attr)

        def counted(*args, **kwargs):
            if self.current is not None:
                out = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
                nbytes = sum(t.numel() * t.element_size() for t in out) if isinstance(out, (list, tuple)) \
                    else out.numel() * out.element_size()
                self.current.collectives += 1
                self.current.bytes += nbytes
                self.current.per_pass[self.phase]["collectives"] += 1
                self.current.per_pass[self.phase]["bytes"] += nbytes
            return original(*args, **kwargs)

        self._patch(backend, attr, counted)

    def _wrap_fetch(self, coordinator: Any) -> None:
        from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
        from deepspeed.utils import z3_leaf_module

        original = coordinator.fetch_sub_module

        def fetch(sub_module, *args, **kwargs):
            self._fetching = {p.ds_id for p in iter_params(sub_module, recurse=z3_leaf_module(sub_module))}
            try:
                return original(sub_module, *args, **kwargs)
            finally:
                self._fetching = None

        self._patch(coordinator, "fetch_sub_module", fetch)

    def _wrap_phase(self, obj: Any, attr: str, phase: str) -> None:
        original = getattr(obj, attr)

        def phased(*args, **kwargs):
            self.phase = phase
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = "other"

        self._patch(obj, attr, phased)

    def _on_forward(self, module, args) -> None:
        if self.current is None:
            return
        name = _pass_from_stack()
        self.current.forwards += 1
        self.current.passes.append(name)
        self.phase = f"{self.current.forwards}:{name}"

    # ------------------------------------------------------------------------------------- use
    @contextlib.contextmanager
    def counting(self) -> Iterator[StepGathers]:
        self.current, self.phase = StepGathers(), "other"
        try:
            yield self.current
        finally:
            self.current, self.phase = None, "other"

    def most_gathered(self, counts: StepGathers, n: int = 5) -> list[tuple[str, int]]:
        return [(self.names.get(i, str(i)), c) for i, c in counts.per_param.most_common(n)]

    def step(self) -> tuple[Any, StepGathers]:
        """One ``trainer.train_step()`` with its gathers counted."""
        with self.counting() as counts:
            report = self.trainer.train_step()
        return report, counts

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
