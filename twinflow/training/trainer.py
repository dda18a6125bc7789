"""The thin training loop: DeepSpeed ZeRO-3 engine + TwinFlow objective + shard EMA teacher + checkpoints.

Building (:class:`Trainer`): join the process group, build the backbone under ``deepspeed.zero.Init``
(every rank seeded alike, so a randomly initialised model is identical everywhere), wrap it in a
DeepSpeed engine (AdamW, the warmup/decay schedule, clipping, gradient accumulation), pick the teacher
(:mod:`twinflow.method.teachers.build`), then resume from a checkpoint if configured and seed each rank's RNG differently.

One optimizer step (:meth:`Trainer.train_step`) runs ``gradient_accumulation_steps`` micro batches:
objective -> ``engine.backward`` -> ``engine.step`` (DeepSpeed applies the optimizer at the boundary).

Non-finite steps. Whether a micro batch's loss is finite is agreed over ranks with one tiny all-reduce.
If it is not, every rank back-propagates ``loss * NaN``, which makes DeepSpeed's global gradient norm
non-finite; ZeRO-3 then discards the accumulated gradients and skips the optimizer step and the LR
scheduler (its overflow path), and the trainer skips the EMA update. A finite loss whose gradient norm
is non-finite takes the same path. Skips are counted and logged; ``train.max_consecutive_nonfinite``
in a row stop the run with :class:`NonFiniteTrainingError`.

The run logger (the resolved config at start, progress bar, TensorBoard, sample grids) lives in
:mod:`.observability`; the loop only talks to the small :class:`RunLogger` protocol below. Checkpoint
contents and names belong to :mod:`.checkpoint`; the trainer hands it its components.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from twinflow.method.objective import TwinFlowObjective
from twinflow.method.teachers import Teacher
from twinflow.method.teachers.build import build_run_teacher
from twinflow.utils.typed_config import ConfigError, to_dict

from .checkpoint import (
    META,
    META_CONFIG,
    META_LAYOUT,
    META_SCHEDULER,
    META_TRAIN_STATE,
    CheckpointStore,
    checkpoints_root,
    is_complete,
    rank_state,
    restore_rank_state,
)
from .config import TrainConfig
from .data import build_loader
from .deepspeed_config import build_deepspeed_config, prepare_jit_environment
from .export import Weights, export_from_trainer, export_layout
from .distributed import DistInfo, all_ranks_agree, any_rank, init_distributed, mean_over_ranks
from .lr_schedule import WarmupDecaySchedule
from .zero_trace import StepTrace

logger = logging.getLogger(__name__)


KILL_EXIT_STATUS = 43
"""Exit status of a rank killed by ``faults.kill_at_step``."""
SAVE_CRASH_EXIT_STATUS = 44
"""Exit status of the ranks ended by ``faults.crash_in_save_at_step``."""


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class RunLogger(Protocol):
    """What the loop needs from the run logger (implemented in :mod:`.observability`).

    Constructed as ``RunLogger(config, rank)`` on every rank. ``log_step`` receives the scalars of
    every optimizer step on every rank (rank-averaged already; write them where ``step % log_every ==
    0``). ``maybe_sample`` is called after every step on every rank: it decides from
    ``train.sample_every`` whether to sample, and if it does it must run on all ranks (ZeRO-3 forwards
    are collective), with ``teacher.session()`` giving the EMA weights; only rank 0 writes files.
    """

    def log_step(self, step: int, scalars: dict[str, float]) -> None: ...

    def maybe_sample(self, step: int, backbone: Any, teacher: Teacher) -> None: ...

    def close(self) -> None: ...


@dataclass
class TrainState:
    """Counters that a checkpoint carries. ``step`` counts attempted optimizer steps (each consumed
    data), ``applied_steps`` those the optimizer applied; the LR schedule follows the latter."""

    step: int = 0
    applied_steps: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, averaged over micro batches and ranks."""

    step: int
    loss: float
    base_loss: float
    rect_loss: float
    grad_norm: float
    lr: float
    applied: bool
    samples_per_second: float

    def scalars(self, state: TrainState) -> dict[str, float]:
        return {
            "loss": self.loss, "loss/base": self.base_loss, "loss/rect": self.rect_loss,
            "grad_norm": self.grad_norm, "lr": self.lr, "samples_per_second": self.samples_per_second,
            "skipped_steps": float(state.skipped_steps),
        }


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from the run seed (distinct streams for distinct ranks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_partitioned_backbone(config: TrainConfig, ds_config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The backbone built under ``deepspeed.zero.Init``: each parameter is partitioned as soon as its
    module is constructed, so no rank ever holds the full model."""
    import deepspeed

    from twinflow.backbones.registry import backbone_spec

    # Resolved (and its modules imported) before entering zero.Init: importing diffusers inside it fails.
    build = backbone_spec(config.model).builder()

    # The parameter dtype comes from ds_config's bf16 flag (checked against model.dtype by the config):
    # DeepSpeed 0.19 ignores an explicit ``dtype`` argument on accelerators without fp16 (CPU).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build(config.model, device)


class Trainer:
    """A ZeRO-3 TwinFlow run described by a :class:`TrainConfig` (see the module docstring).

    ``logger_factory(config, rank)`` makes the run logger; the default is
    :class:`twinflow.training.observability.RunLogger`.
    """

    def __init__(self, config: TrainConfig, *, logger_factory: Optional[Callable[[TrainConfig, int], RunLogger]] = None):
        import deepspeed

        self.config = config
        self.dist: DistInfo = init_distributed(config.deepspeed.dist_backend)
        self.ds_config = build_deepspeed_config(config, self.dist.world_size, on_cpu=self.dist.device.type == "cpu")
        if (arch_list := prepare_jit_environment()) is not None:
            logger.info("TORCH_CUDA_ARCH_LIST rewritten to %r for DeepSpeed's op builder", arch_list)
        seed_everything(config.train.seed)
        self.backbone = build_partitioned_backbone(config, self.ds_config, self.dist.device)
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.backbone,
            model_parameters=trainable,
            config=self.ds_config,
            lr_scheduler=lambda opt: WarmupDecaySchedule(opt, config.optim, config.train.max_steps),
        )
        # One ZeRO-3 prefetch trace per micro batch's step (all its forwards and the backward), not per forward.
        self.step_trace = StepTrace(self.engine)
        self.teacher = build_run_teacher(
            online=self.engine, module=self.backbone, optimizer=self.optimizer, lora=config.model.lora.enabled,
            ema_decay_rate=config.method.ema_decay_rate, backend=config.kernels,
        )
        self.objective = TwinFlowObjective(config.method)
        self._layout = export_layout(self.backbone, self.optimizer)
        self.loader = build_loader(config.data, config.synthetic_data, config.train.micro_batch_size,
                                   self.dist.rank, self.dist.world_size, family=config.model.family,
                                   image_free=config.method.use_image_free)
        self.store = CheckpointStore(checkpoints_root(config.output_dir), self.dist.rank, self.dist.world_size,
                                     config.train.keep_last, fault_after_rank_files=self._save_fault,
                                     fault_in_commit=self._commit_fault, fault_in_prune=self._prune_fault)
        self.store.sweep_leftovers()  # what a killed save or prune left (.tmp-*, .trash-*)
        self.state = TrainState()
        seed_everything(rank_seed(config.train.seed, self.dist.rank))
        self.resumed_from = self._resume()
        self._batches = iter(self.loader)
        if logger_factory is None:
            from . import observability

            self.run_logger: RunLogger = observability.RunLogger(config, self.dist.rank, data_stats=self.loader.stats)
        else:
            self.run_logger = logger_factory(config, self.dist.rank)

    # ---------------------------------------------------------------------------------------- loop
    def train(self, max_steps: Optional[int] = None) -> list[StepReport]:
        """Run optimizer steps until ``max_steps`` (default ``train.max_steps``) have been attempted,
        saving on the configured cadence and at the end. Returns this call's reports."""
        end = self.config.train.max_steps if max_steps is None else max_steps
        reports = []
        while self.state.step < end:
            report = self.train_step()
            reports.append(report)
            self._after_step(report, final=self.state.step >= end)
        return reports

    def train_step(self) -> StepReport:
        """One optimizer step over ``gradient_accumulation_steps`` micro batches."""
        cfg = self.config
        start = time.perf_counter()
        self.state.step += 1
        lr = float(self.engine.get_lr()[0])
        gas = cfg.optim.gradient_accumulation_steps
        parts = torch.zeros(3, device=self.dist.device)
        poisoned = False
        for _ in range(gas):
            batch = next(self._batches).to(self.dist.device)
            with self.step_trace.step():
                out = self.objective.training_step(self.engine, batch.latents, batch.cond, batch.uncond, self.teacher)
                loss = out.loss
                if self.state.step in cfg.faults.nonfinite_loss_steps:
                    loss = loss * float("nan")
                poisoned = any_rank(not bool(torch.isfinite(loss.detach())), self.dist.device) or poisoned
                self.engine.backward(loss * float("nan") if poisoned else loss)
            self.engine.step()
            parts += torch.stack([loss.detach(), out.base_loss, out.rect_loss]).float() / gas
        applied = bool(self.engine.was_step_applied())
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if applied:
            self.teacher.update()
            self.state.applied_steps += 1
            self.state.consecutive_nonfinite = 0
        else:
            self._count_nonfinite()
        loss, base, rect = mean_over_ranks(parts).tolist()
        seconds = time.perf_counter() - start
        samples = cfg.train.micro_batch_size * gas * self.dist.world_size
        return StepReport(self.state.step, loss, base, rect, grad_norm, lr, applied, samples / seconds)

    def _count_nonfinite(self) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        limit = self.config.train.max_consecutive_nonfinite
        if self.dist.is_main:
            logger.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total)",
                           self.state.step, self.state.consecutive_nonfinite, self.state.skipped_steps)
        if self.state.consecutive_nonfinite >= limit:
            raise NonFiniteTrainingError(
                f"{self.state.consecutive_nonfinite} consecutive optimizer steps (up to step {self.state.step}) had a "
                f"non-finite loss or gradient norm (limit train.max_consecutive_nonfinite={limit}); "
                "lower optim.lr, check the data, or resume from the last checkpoint"
            )

    def _after_step(self, report: StepReport, final: bool) -> None:
        """Logging, sampling, checkpointing and the kill fault, in that order."""
        cfg = self.config.train
        step = self.state.step
        self.run_logger.log_step(step, report.scalars(self.state))
        self.run_logger.maybe_sample(step, self.engine, self.teacher)
        periodic = bool(cfg.save_every) and step % cfg.save_every == 0
        if periodic or (final and cfg.save_final):
            self.save_checkpoint()
        faults = self.config.faults
        if faults.kill_at_step == step and faults.kill_rank == self.dist.rank:
            os._exit(KILL_EXIT_STATUS)

    # --------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Collective: write a complete checkpoint of the current step (see :mod:`.checkpoint`)."""
        tensors, rank_data = rank_state(self.optimizer, self.teacher, self.loader, self.dist.device)
        meta = {
            META_TRAIN_STATE: dataclasses.asdict(self.state),
            META_SCHEDULER: self.scheduler.state_dict(),
            META_CONFIG: to_dict(self.config),
            META_LAYOUT: self._layout,
        }
        return self.store.save(self.state.step, tensors, rank_data, meta)

    def _resume(self) -> Optional[Path]:
        mode = self.config.train.resume
        if mode == "none":
            if self.store.complete_checkpoints():
                raise ConfigError(
                    f"config key 'train.resume' is 'none' but {self.store.root} already holds checkpoints; "
                    "use resume: auto to continue that run, or another train.output_dir"
                )
            return None
        path = self.store.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        if not is_complete(path):
            raise ConfigError(f"config key 'train.resume': {path} is not a complete checkpoint (no {META})")
        with all_ranks_agree(f"reading checkpoint {path}"):  # each rank reads its own files
            meta, tensors, rank_data = self.store.load(path)
        restore_rank_state(self.optimizer, self.teacher, self.loader, tensors, rank_data, self.dist.device)
        self.scheduler.load_state_dict(meta[META_SCHEDULER])  # pure: no RNG, no collective
        self.state = TrainState(**meta[META_TRAIN_STATE])
        if self.dist.is_main:
            logger.info("resumed from %s at step %d", path, self.state.step)
        return path

    def export(self, out: str | Path, *, weights: Weights = "ema", merge_lora: bool = False) -> Optional[Path]:
        """Collective: write the online or EMA transformer as a diffusers folder (see :mod:`.export`)."""
        return export_from_trainer(self, out, weights=weights, merge_lora=merge_lora)

    def close(self) -> None:
        self.run_logger.close()

    def _prune_fault(self, step: int) -> None:
        """Test hook (``faults.crash_in_prune_at_step``): die while pruning, a checkpoint in the trash."""
        if self.config.faults.crash_in_prune_at_step == step:
            os._exit(SAVE_CRASH_EXIT_STATUS)

    def _save_fault(self, step: int) -> None:
        """Test hook (``faults.crash_in_save_at_step``): die after this rank's files are written."""
        if self.config.faults.crash_in_save_at_step == step:
            os._exit(SAVE_CRASH_EXIT_STATUS)

    def _commit_fault(self, step: int) -> None:
        """Test hook (``faults.fail_commit_at_step``): rank 0's checkpoint commit fails."""
        if self.config.faults.fail_commit_at_step == step:
            raise OSError(f"injected failure in the checkpoint commit at step {step} (faults.fail_commit_at_step)")
