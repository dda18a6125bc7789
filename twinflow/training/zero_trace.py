"""One ZeRO-3 parameter-fetch trace per training step instead of one per top-level forward.

DeepSpeed ZeRO-3 records the order in which submodules fetch their parameters during "one forward +
backward" and replays it to prefetch: the parameter coordinator's ``reset_step`` marks the start of
such a unit, and DeepSpeed calls it from a forward pre-hook on the engine's top module
(``DeepSpeedZeRoOffload.setup_zero_stage3_hooks``), i.e. at every top-level forward. A TwinFlow step
runs about six top-level forwards of the backbone (adv fakes, main, guidance, two RCGM passes,
rectification) and then one backward, so the unit DeepSpeed records is one forward. Replaying it works
for the following forwards, but the backward runs past its end: the trace is invalidated, the
backward fetches module by module without prefetch, and the next step's first forward runs untraced
(module by module again) while a new trace is recorded.

:class:`StepTrace` makes the unit the whole training step: it replaces that pre-hook by one that resets
only outside :meth:`StepTrace.step`, and resets once on entering it. Within a step the recorded order
covers every forward and the backward, so DeepSpeed prefetches across the forwards' boundaries and into
the backward, and every step replays the same trace. Forwards outside a step (sampling, evaluation,
tests) reset as before. Nothing else changes: which parameters are fetched, released and kept follows
DeepSpeed's own rules and limits (``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``,
``stage3_max_reuse_distance``), so memory stays bounded by the same settings; nothing gathers the
whole model at once.

Teacher sessions (:mod:`twinflow.method.teachers.zero3`) swap the partitions inside a step; they release every gathered
parameter (``optimizer.empty_partition_cache``) on entry and on exit, so that the next pass gathers
from the partition current after the swap. A prefetch that crossed such a boundary would be wasted (it
gathered the other weights; the release drops it) and would cost one extra gather of the first modules
of the next pass. So the trace is *fenced* at these releases: the step in which the trace is recorded
notes where they happen, and in the steps that replay it the prefetcher only sees the queue of
parameters up to the next release; each release appends the next segment. Within a segment DeepSpeed
prefetches as usual, across passes of the same weights included. The result: every parameter is
gathered at most once per forward plus once for the backward, the step's first forward is prefetched
and the backward is traced (DeepSpeed's per-forward trace reached neither); how far the backward
prefetches is then up to ``stage3_max_live_parameters`` (BENCHMARKS.md has the counts).

This relies on DeepSpeed internals checked on 0.19.8: ``parameter_offload.fwd_pre_hook``, the
coordinator's ``reset_step`` and its private ``__param_queue`` / ``__step_id``. If they are absent
(another version, or not ZeRO-3), :meth:`step` is a no-op and DeepSpeed's per-forward behaviour stays.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

logger = logging.getLogger(__name__)


_COORD = "_PartitionedParameterCoordinator__"


class StepTrace:
    """Moves DeepSpeed ZeRO-3's trace reset from every top-level forward to the start of each step,
    and fences the prefetch queue at the step's releases of all gathered parameters (teacher sessions)."""

    def __init__(self, engine: Any):
        self.active = False
        self.fence = True  # fence the prefetch queue at teacher-session releases (tests turn it off)
        self._in_step = False
        self._recording: list[int] | None = None  # release points seen in the step being recorded
        self._fences: list[int] = []  # release points of the recorded trace (coordinator step ids)
        self._pending: list[list[Any]] = []  # queue segments after the next release point
        optimizer = getattr(engine, "optimizer", None)
        offload = getattr(optimizer, "parameter_offload", None)
        hook = getattr(offload, "fwd_pre_hook", None)
        coordinator = offload.get_param_coordinator() if offload is not None else None
        needed = ("reset_step", "is_record_trace", "is_complete_trace", "is_invalid_trace", "_invalidate_trace",
                  _COORD + "param_queue", _COORD + "step_id")
        if hook is None or coordinator is None or not all(hasattr(coordinator, n) for n in needed) \
                or not hasattr(optimizer, "empty_partition_cache"):
            logger.warning("ZeRO-3 step trace unavailable (DeepSpeed internals not found): DeepSpeed resets its "
                           "parameter trace at every top-level forward")
            return
        self._coordinator = coordinator
        hook.remove()
        # First among the top module's pre-hooks, where DeepSpeed's own reset hook was: the reset must
        # precede the top module's parameter fetch. Kept under DeepSpeed's name so its destroy() removes it.
        offload.fwd_pre_hook = offload.module.register_forward_pre_hook(self._on_top_level_forward, prepend=True)
        release = optimizer.empty_partition_cache

        def empty_partition_cache(*args: Any, **kwargs: Any) -> Any:
            out = release(*args, **kwargs)
            self._on_release()
            return out

        optimizer.empty_partition_cache = empty_partition_cache
        self.active = True

    # ------------------------------------------------------------------------------ DeepSpeed side
    def _on_top_level_forward(self, module: Any, *args: Any) -> None:
        if not self._in_step:
            self._coordinator.reset_step()

    def _coordinator_step(self) -> int:
        return getattr(self._coordinator, _COORD + "step_id")

    def _queue(self) -> Any:
        return getattr(self._coordinator, _COORD + "param_queue")

    def _mode(self) -> int:
        c = self._coordinator
        return 2 if c.is_complete_trace() else 1 if c.is_record_trace() else 0

    def _agree_on_the_trace_mode(self) -> None:
        """Every rank enters ``reset_step`` in the same trace mode, or none keeps its trace.

        DeepSpeed's reset runs collectives (``assert_ints_same_as_other_ranks``) only on ranks whose trace
        is not complete. With one reset per step a rank's trace can break alone (say, its step ran one
        forward fewer), and the ranks would then call different collectives and hang. One tiny all-reduce
        per step finds that; every rank then drops its trace and all record the next one together."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        from .distributed import collective_device

        mode = self._mode()
        span = torch.tensor([mode, -mode], dtype=torch.int32, device=collective_device())
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        if int(span[0]) != -int(span[1]) and not self._coordinator.is_invalid_trace():
            self._coordinator._invalidate_trace()

    def _reset(self) -> None:
        """DeepSpeed's reset, then the fences: recorded ones become valid when the trace completes."""
        self._agree_on_the_trace_mode()
        was_recording = self._coordinator.is_record_trace()
        self._coordinator.reset_step()
        if self._coordinator.is_record_trace():
            self._recording, self._fences = [], []
        elif self._coordinator.is_complete_trace():
            if was_recording:
                self._fences = self._recording or []
            self._recording = None
        else:
            self._recording, self._fences = None, []
        self._pending = []
        queue = self._queue()
        if self.fence and self._fences and self._coordinator.is_complete_trace() and queue is not None:
            entries = list(queue)
            bounds = [0, *self._fences]
            segments: list[list[Any]] = [[] for _ in bounds]
            k = 0
            for entry in entries:  # entries are in trace order
                while k + 1 < len(bounds) and entry.step_id_last_used_at >= bounds[k + 1]:
                    k += 1
                segments[k].append(entry)
            queue.clear()
            queue.extend(segments[0])
            self._pending = segments[1:]

    def _on_release(self) -> None:
        """Every gathered parameter was just released (a teacher session's entry or exit)."""
        if not self._in_step:
            return
        step = self._coordinator_step()
        if self._recording is not None and self._coordinator.is_record_trace():
            self._recording.append(step)
            return
        if not self._pending:
            return
        queue = self._queue()
        fence = self._fences[len(self._fences) - len(self._pending)]
        if queue is None or not self._coordinator.is_complete_trace() or step != fence:
            # The step left the recorded trace (DeepSpeed invalidates it and records anew): unfence.
            if queue is not None:
                for segment in self._pending:
                    queue.extend(segment)
            self._pending = []
            return
        queue.extend(self._pending.pop(0))

    # --------------------------------------------------------------------------------------- use
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Every forward and backward of one micro batch's training step, as one trace unit."""
        if not self.active or self._in_step:
            yield
            return
        self._reset()
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
            if self._pending:  # releases fewer than recorded: hand the rest back to DeepSpeed
                queue = self._queue()
                if queue is not None:
                    for segment in self._pending:
                        queue.extend(segment)
                self._pending = []
