"""GPU check, training part: a tiny ZeRO-3 run on one GPU with the optimizer a GPU run uses, saved,
killed and resumed; the resumed run's per-step losses must equal an uninterrupted run's.

For each variant (``fused``: DeepSpeed's FusedAdam, the default on CUDA; ``offload``: the optimizer
offloaded to the CPU, i.e. DeepSpeedCPUAdam), three launches of ``deepspeed --module twinflow.train``
on ``configs/tiny_cpu.yaml`` with the Triton kernels on (``kernels=auto``):

1. straight: 6 steps, a checkpoint every 2;
2. killed: the same in another folder, rank 0 killed right after step 5 (``faults.kill_at_step``), so
   the latest checkpoint is step 4;
3. resumed: the same command again, which continues from step 4 and finishes.

Results are appended to ``$OUT/train_check.json`` after every launch, so a timeout loses nothing.
``--dry-run`` prints the commands without running them (what CI checks).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
VARIANTS = {"fused": ["deepspeed.offload_optimizer=false"], "offload": ["deepspeed.offload_optimizer=true"]}
COMMON = ["train.max_steps=6", "train.save_every=2", "train.keep_last=2", "kernels=auto"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir: Path, extra: list[str]) -> list[str]:
    # The launcher through its module: a --target install has no console script on PATH.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--no_local_rank", "--master_port", str(_port()), "--module",
            "twinflow.train", "--config", str(CONFIG), f"train.output_dir={run_dir}", *COMMON, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from the run's JSON-lines log (a resumed run appends to the same file; the last
    entry of a step wins)."""
    out: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "loss" in row:
                    out[int(row["step"])] = float(row["loss"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/twinflow_train_check", help="run folders go here")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT", ".")) / "train_check.json"
    work = Path(args.work)
    results: dict = {}
    ok = True
    for variant in args.variant or list(VARIANTS):
        extra = VARIANTS[variant]
        straight, chain = work / variant / "straight", work / variant / "chain"
        launches = [("straight", straight, extra), ("killed", chain, extra + ["faults.kill_at_step=5", "faults.kill_rank=0"]),
                    ("resumed", chain, extra)]
        entry: dict = {"launches": {}}
        results[variant] = entry
        for name, run_dir, overrides in launches:
            cmd = command(run_dir, overrides)
            if args.dry_run:
                print(" ".join(cmd))
                continue
            t0 = time.time()
            log = work / variant / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            # cuBLAS picks reduction orders per workspace; a fixed workspace config makes repeated runs
            # comparable bit for bit. max_abs_diff is recorded beside the strict equality either way.
            env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
            with open(log, "w") as sink:
                rc = subprocess.run(cmd, cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=420).returncode
            entry["launches"][name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "log_tail": log.read_text()[-1500:]}
            if name == "killed":
                entry["latest_after_kill"] = (chain / "checkpoints" / "latest").read_text().strip() \
                    if (chain / "checkpoints" / "latest").is_file() else None
            out.write_text(json.dumps(results, indent=1))
            print(f"{variant} {name}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
        if args.dry_run:
            continue
        a, b = losses(straight), losses(chain)
        entry["straight_losses"], entry["resumed_losses"] = a, b
        entry["max_abs_diff"] = max((abs(a[s] - b[s]) for s in a if s in b), default=None)
        entry["equal"] = bool(a) and a.keys() == b.keys() and all(a[s] == b[s] for s in a)
        entry["passed"] = (entry["launches"]["straight"]["rc"] == 0 and entry["launches"]["resumed"]["rc"] == 0
                           and entry.get("latest_after_kill") == "step_00000004" and entry["equal"])
        ok &= entry["passed"]
        out.write_text(json.dumps(results, indent=1))
        print(f"{variant}: {'PASS' if entry['passed'] else 'FAIL'} (max |loss difference| {entry['max_abs_diff']})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
