"""``twinflow demo``: train an any-step generator on the embedded shapes dataset and show what it does.

1. Checks the machine (disk space, a C compiler for DeepSpeed's ops, a free rendezvous port) and says
   what to do in one line when something is missing.
2. Prepares the inputs (:mod:`twinflow.demo.prepare`): a tiny conditioning model, the dataset, the cache.
3. Launches the ``deepspeed`` launcher three times. TwinFlow converts a *pretrained* flow-matching
   model into an any-step one (from random weights its consistency targets are noise that drowns the
   flow-matching signal), so, as with Qwen-Image, a shared flow-matching pretraining comes first
   (``configs/demo_shapes.yaml``). From its export, TwinFlow (with its EMA teacher) and, for
   comparison, flow matching are trained the same way (same model, data, steps, seed, learning rate).
4. Exports both fine-tuned runs (online and EMA weights) to diffusers format, samples every prompt at 1,
   2, 4 (any-step) and 30 (multi-step) NFE, scores the samples (:mod:`twinflow.demo.scoring`) and
   writes a grid per setting, a loss-curve PNG and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from twinflow.utils.typed_config import ConfigError

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_shapes.yaml"
METHODS = ("twinflow", "flow_matching")
# Second stage, on top of the pretraining config: start from the pretrained export, a lower rate.
FINETUNE = ["optim.lr=3.0e-4", "optim.warmup_steps=5", "train.max_steps=100", "train.save_every=50", "train.log_every=5",
            "model.transformer=null"]
MIN_FREE_BYTES = 2 * 1024**3
COMPARISON_PNG = "comparison.png"
# The batch the demo was tuned with (2 CPU ranks x 16); launch() divides it among the ranks.
GLOBAL_BATCH = 32


class DemoError(RuntimeError):
    """A problem the user can fix; printed as one line, without a traceback."""


def check_machine(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise DemoError(f"only {free / 1024**3:.1f} GiB free under {out}; the demo needs about 2 GiB (use --out elsewhere)")
    if shutil.which("deepspeed") is None:
        raise DemoError("the 'deepspeed' launcher is not on PATH: install DeepSpeed (`make setup` does it)")
    if not torch.cuda.is_available() and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise DemoError("no C++ compiler found: DeepSpeed builds its CPU communication op with g++ (apt-get install g++)")


def free_port(preferred: int = 29500) -> int:
    """``preferred`` when nothing listens there, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise DemoError("no free TCP port for DeepSpeed's rendezvous on 127.0.0.1")


def micro_batch_size(ranks: int) -> int:
    """Per-rank batch that keeps the global batch at :data:`GLOBAL_BATCH` (rounded down) on up to eight
    ranks, so the demo trains the same way on 2 CPU ranks, one GPU or eight. Never below 4: TwinFlow
    splits each micro batch into its four groups (e2e, mul, any, adv)."""
    return max(4, GLOBAL_BATCH // ranks)


def launch(config: Path, overrides: list[str], log: Path) -> None:
    """Run one training through the deepspeed launcher; its output goes to the terminal and ``log``."""
    gpus = torch.cuda.device_count()
    env = dict(os.environ)
    if gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    ranks = gpus or 2  # every GPU, or 2 CPU ranks without one
    overrides = [f"train.micro_batch_size={micro_batch_size(ranks)}", *overrides]  # user overrides come later and win
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--num_nodes", "1", "--no_local_rank",
           "--master_port", str(free_port()), "--module", "twinflow.train", "--config", str(config), *overrides]
    print("twinflow demo: running " + " ".join(cmd), flush=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:  # type: ignore[union-attr]
            sink.write(line)
            tail = (tail + [line])[-30:]
            if "train" in line or "step" in line or "Error" in line:
                sys.stdout.write(line)
        proc.wait()
    if proc.returncode != 0:
        text = "".join(tail)
        if "No space left on device" in text:
            raise DemoError(f"the disk filled up during training (see {log})")
        if "Address already in use" in text:
            raise DemoError(f"DeepSpeed's rendezvous port was taken while starting; run the demo again (see {log})")
        raise DemoError(f"training failed with exit code {proc.returncode}; the last lines are in {log}")


def loss_curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for name, run_dir in runs.items():
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        steps = [r["step"] for r in rows if "loss" in r]
        # The fine-tunes continue from the pretraining's last step; plot them there.
        ax.plot([offset + s for s in steps], [r["loss"] for r in rows if "loss" in r], label=name)
        if name == "pretrain" and steps:
            offset = steps[-1]
    ax.set_xlabel("optimizer step (fine-tunes continue from the pretraining)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("demo: training loss (each method's own objective)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The comparison figure's columns: (export, setting, header).
COMPARISON = [("twinflow", "1nfe", "TwinFlow\n1 NFE"), ("twinflow", "2nfe", "TwinFlow\n2 NFE"),
              ("twinflow", "4nfe_any", "TwinFlow\n4 NFE"), ("twinflow", "30nfe_multi", "TwinFlow\n30 NFE"),
              ("flow_matching", "1nfe", "flow match.\n1 NFE"), ("flow_matching", "30nfe_multi", "flow match.\n30 NFE")]


def write_comparison(path: Path, results: dict, images: dict, prompts) -> None:
    """The one figure to read at a glance: a dozen prompts, TwinFlow at 1/2/4/30 NFE beside flow
    matching at 1/30 NFE (online weights), each column headed by its score."""
    from .evaluate import comparison_rows, save_comparison

    columns = [(f"{header}: {results[name][label]['score']:.2f}", images[name][label]) for name, label, header in COMPARISON]
    save_comparison(path, columns, prompts, comparison_rows(len(prompts)))


def evaluate_exports(inputs, exports: dict[str, Path], out: Path, samples_per_prompt: int) -> dict:
    from twinflow.backbones.qwen_image.backbone import QwenImageBackbone
    from twinflow.backbones.qwen_image.encoders import QwenImageConditioner
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

    from .evaluate import evaluate, grid_images, save_grid
    from .prepare import FOLD, IMAGE_SIZE, latents_to_pixels
    from .shapes import all_prompts

    conditioner = QwenImageConditioner.from_pretrained(inputs.model_dir, text_encoder_dtype=torch.float32, vae_dtype=torch.float32)
    prompts = all_prompts()
    cond = conditioner.encode_prompts([p.text for p in prompts])
    del conditioner
    results: dict = {}
    images: dict = {}
    for name, folder in exports.items():
        transformer = TwinFlowQwenImageTransformer.from_pretrained(str(folder), torch_dtype=torch.float32)
        model = QwenImageBackbone(transformer.eval(), dtype=torch.float32, edit=False)
        c = transformer.config
        latent_shape = (c.out_channels, IMAGE_SIZE // FOLD, IMAGE_SIZE // FOLD)
        settings = evaluate(model, prompts, cond, latent_shape, latents_to_pixels, samples_per_prompt, desc=f"sampling {name}")
        results[name] = {}
        images[name] = {r.label: r.images for r in settings}
        for r in settings:
            results[name][r.label] = {"nfe": r.nfe, **{k: round(v, 4) for k, v in r.scores.items()}}
            grid = grid_images(r.images, len(prompts), samples_per_prompt, show=len(prompts))
            save_grid(out / "samples" / f"{name}_{r.label}.png", grid, prompts, samples_per_prompt,
                      f"{name}, {r.label} ({r.nfe} NFE): score {r.scores['score']:.2f}")
    if all(name in images for name, _, _ in COMPARISON):
        write_comparison(out / COMPARISON_PNG, results, images, prompts)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinflow demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where everything is written (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the config's)")
    parser.add_argument("--items", type=int, default=1920, help="dataset size (32 images per prompt by default)")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--config", default=str(REPO_CONFIG), help="training config (default: configs/demo_shapes.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training-config override for both methods (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    started = time.time()
    try:
        check_machine(out)
        from .prepare import IMAGE_SIZE, prepare_inputs

        print("twinflow demo: preparing the shapes dataset and its cache", flush=True)
        inputs = prepare_inputs(out, args.items, image_size=IMAGE_SIZE)
        runs, exports, timings = {}, {}, {}
        stages = [("pretrain", "flow_matching", [])] + [(m, m, FINETUNE + [f"model.pretrained={out / 'export' / 'pretrain'}"]) for m in METHODS]
        for name, preset, extra in stages:
            run_dir = out / "train" / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            overrides = [f"method.preset={preset}", f"train.output_dir={run_dir}",
                         f"data.paths=[{inputs.data_dir}]", f"data.cache_dir={inputs.cache_dir}", *extra]
            if args.steps is not None:
                overrides.append(f"train.max_steps={args.steps}")
            overrides += args.overrides
            t0 = time.time()
            launch(Path(args.config), overrides, out / f"train_{name}.log")
            timings[name] = round(time.time() - t0, 1)
            runs[name] = run_dir
            from twinflow.training.checkpoint import checkpoints_root, latest_checkpoint
            from twinflow.training.export import export_checkpoint

            checkpoint = latest_checkpoint(checkpoints_root(run_dir))
            if checkpoint is None:
                raise DemoError(f"the {name} run left no complete checkpoint under {checkpoints_root(run_dir)}")
            weights = ["online"] if name == "pretrain" else ["online", "ema"]
            for w in weights:
                folder = out / "export" / (name if w == "online" else f"{name}_ema")
                export_checkpoint(checkpoint, folder, weights=w)
                exports[folder.name] = folder
        loss_curves(runs, out / "loss_curve.png")
        evaluated = {k: v for k, v in exports.items() if k != "pretrain"}
        results = evaluate_exports(inputs, evaluated, out, args.samples_per_prompt)
    except (DemoError, ConfigError, OSError) as e:
        print(f"twinflow demo: {e}", file=sys.stderr)
        return 2
    tw, fm = results["twinflow"], results["flow_matching"]
    # The bar is read on the online weights; the EMA teacher's numbers are reported beside them.
    bar = {
        "twinflow_1nfe_over_30nfe": round(tw["1nfe"]["score"] / max(tw["30nfe_multi"]["score"], 1e-9), 3),
        "twinflow_1nfe_minus_flow_matching_1nfe": round(tw["1nfe"]["score"] - fm["1nfe"]["score"], 3),
    }
    bar["passes"] = bar["twinflow_1nfe_over_30nfe"] >= 0.8 and bar["twinflow_1nfe_minus_flow_matching_1nfe"] >= 0.1
    metrics = {"scores": results, "bar": bar, "train_seconds": timings, "total_seconds": round(time.time() - started, 1),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (2 DeepSpeed ranks)"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\nscore (mean of object/colour/count/position pass rates) by NFE:")
    for name in results:
        print(f"  {name:18s} " + "  ".join(f"{k}: {v['score']:.2f}" for k, v in results[name].items()))
    print(f"bar: TwinFlow 1-NFE / 30-NFE = {bar['twinflow_1nfe_over_30nfe']:.2f} (>= 0.8), "
          f"TwinFlow 1-NFE - flow matching 1-NFE = {bar['twinflow_1nfe_minus_flow_matching_1nfe']:+.2f}: "
          f"{'met' if bar['passes'] else 'NOT met'}")
    print(f"\ncomparison:    {out / COMPARISON_PNG}")
    print(f"sample grids:  {out / 'samples'}")
    print(f"loss curve:    {out / 'loss_curve.png'}")
    print(f"metrics:       {out / 'metrics.json'}")
    print(f"exported EMA:  {out / 'export'} (diffusers format)")
    print(f"\nsample from it (the export records its encoders, latent codec and image size):\n  {sample_command(out)}")
    return 0


def sample_command(out: Path) -> str:
    """The ``twinflow sample`` command that draws from the demo's TwinFlow EMA export."""
    import shlex

    return shlex.join(["twinflow", "sample", "--model", str(out / "export" / "twinflow_ema"),
                       "--prompt", "two red squares", "--output", str(out / "sampled")])
