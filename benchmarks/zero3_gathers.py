"""ZeRO-3 parameter all-gathers per optimizer step of the TwinFlow trainer, per pass.

Run through the DeepSpeed launcher (2 CPU ranks over gloo here; any accelerator works):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/zero3_gathers.py --config configs/tiny_cpu.yaml \
        [--steps 4] [--json out.json] [key.path=value ...]

Every step prints: parameter gathers (one per parameter fetched) and the elements they carry, all-gather
collectives and their output bytes, the number of top-level forwards, the most gathers any one parameter
had, and the budget ``(forwards + 1) x parameters`` (one gather per forward plus one for the backward).
``--per-pass`` adds the breakdown by pass (``3:guidance`` is the step's third forward). The tiny config
keeps every parameter persistent (DeepSpeed's default ``stage3_param_persistence_threshold`` exceeds
each of its tensors); pass ``"deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"``
to see the per-module gathers a large model has. Counting is in :mod:`benchmarks.gather_count`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _NullLogger:
    def __init__(self, config, rank):
        pass

    def log_step(self, step, scalars):
        pass

    def maybe_sample(self, step, backbone, teacher):
        pass

    def close(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the per-step counts here (rank 0)")
    parser.add_argument("--per-pass", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from benchmarks.gather_count import GatherCounter
    from twinflow.training.config import load_train_config
    from twinflow.training.trainer import Trainer

    out = tempfile.mkdtemp(prefix="zero3_gathers_")
    overrides = [f"train.output_dir={out}", "train.save_every=0", f"train.max_steps={max(args.steps, 1)}",
                 *args.overrides]
    trainer = Trainer(load_train_config(args.config, overrides), logger_factory=_NullLogger)
    counter = GatherCounter(trainer)
    rank = trainer.dist.rank
    n_params = len(counter.numel)
    persistent = sum(1 for p in trainer.backbone.parameters() if getattr(p, "ds_persist", False))
    rows = []
    if rank == 0:
        print(f"[zero3_gathers] {n_params} partitioned parameters ({persistent} persistent), "
              f"{counter.total_numel} elements, world size {trainer.dist.world_size}", flush=True)
    for _ in range(args.steps):
        report, counts = counter.step()
        row = {"step": report.step, "loss": report.loss, **counts.summary(),
               "most_gathered": counter.most_gathered(counts),
               "budget_params": (counts.forwards + 1) * n_params,
               "budget_elements": (counts.forwards + 1) * counter.total_numel}
        rows.append(row)
        if rank == 0:
            print(f"[zero3_gathers] step {row['step']}: loss {row['loss']:.6f} | param gathers {row['params']} "
                  f"({row['prefetched']} prefetched, {row['elements']} elements) | collectives {row['collectives']} ({row['bytes']} B) | "
                  f"forwards {row['forwards']} {row['passes']} | max per param {row['max_gathers_per_param']} | "
                  f"budget (forwards+1) x params {row['budget_params']}", flush=True)
            if args.per_pass:
                print(f"[zero3_gathers]     most gathered: {row['most_gathered']}", flush=True)
                for name, c in row["per_pass"].items():
                    print(f"[zero3_gathers]     {name:>18}: {c}", flush=True)
    counter.remove()
    trainer.close()
    if rank == 0 and args.json:
        meta = {"config": args.config, "overrides": args.overrides, "params": n_params, "persistent": persistent,
                "elements": counter.total_numel, "world_size": trainer.dist.world_size}
        Path(args.json).write_text(json.dumps({"meta": meta, "steps": rows}, indent=1))


if __name__ == "__main__":
    main()
