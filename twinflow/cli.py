"""The ``twinflow`` command: ``memory-plan``, ``train``, ``export``, ``sample``, ``demo`` and ``env``.

Subcommands live in a registry (:func:`register`), so a component can add its own without editing the
parser; each one imports its heavy dependencies (torch, diffusers, DeepSpeed) only when it runs, so
``twinflow --help`` and configuration errors answer immediately.

Errors a user can fix (a bad config key, a missing file, an absent optional component) are printed as
one ``twinflow <subcommand>: error: ...`` line with exit code 2 and no traceback; a memory plan that
does not fit exits with 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from twinflow.utils.typed_config import ConfigError

EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """A problem the user can fix; reported without a traceback."""


@dataclass(frozen=True)
class Subcommand:
    """One ``twinflow <name>``: ``configure`` adds its arguments, ``run`` returns the exit code.

    A ``passthrough`` command parses nothing itself: every argument after its name reaches ``run`` as
    ``args.args`` (for components with their own parser, e.g. ``demo``, ``export``).
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passthrough: bool = False
    one_line_errors: bool = False
    """Every exception is reported as one line (type and message); ``TWINFLOW_TRACEBACK=1`` shows the
    traceback instead. For one-process commands (sample, export, memory-plan), where any failure is
    about the user's inputs or machine; ``train`` and ``demo`` report their own failures."""


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(command: Subcommand) -> Subcommand:
    """Add a subcommand (a name can be registered once)."""
    if command.name in SUBCOMMANDS:
        raise ValueError(f"subcommand {command.name!r} is already registered")
    SUBCOMMANDS[command.name] = command
    return command


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/qwen_image_full.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.micro_batch_size=2")


def _load_config(args: argparse.Namespace):
    from twinflow.training.config import load_train_config

    return load_train_config(args.config, args.overrides)


# ------------------------------------------------------------------------------------ memory-plan


def _configure_memory_plan(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p)
    p.add_argument("--world-size", type=int, default=8, help="number of GPUs (ZeRO-3 ranks); default 8")
    p.add_argument("--gpu-mem", type=float, default=80.0,
                   help="device memory per GPU in GiB (torch.cuda.get_device_properties(0).total_memory / 2**30)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens per row the batch is padded to (default: the cache's max_sequence_length, "
                        "else 1024, the encoder's limit)")
    p.add_argument("--cuda-context", type=float, default=2.0, help="GiB assumed for CUDA context, NCCL and workspaces")
    p.add_argument("--fragmentation", type=float, default=0.10, help="fraction of allocated memory assumed lost to fragmentation")


def _run_memory_plan(args: argparse.Namespace) -> int:
    config = _load_config(args)
    from twinflow.training.memory_plan import plan_from_config

    plan = plan_from_config(
        config, args.world_size, args.gpu_mem, text_tokens=args.text_tokens, cuda_context_gib=args.cuda_context,
        fragmentation=args.fragmentation, config_name=str(args.config),
    )
    print(plan.format_table())
    return EXIT_OK if plan.fits else EXIT_DOES_NOT_FIT


# ------------------------------------------------------------------------------------------ train


def _configure_train(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p)
    p.add_argument("--num-gpus", type=int, default=None,
                   help="ranks to launch; default: every visible GPU, or 2 CPU ranks (DS_ACCELERATOR=cpu) without one")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command without running it")


def launch_command(config: str, overrides: Sequence[str], num_gpus: int | None, gpu_count: int) -> tuple[list[str], dict[str, str]]:
    """The DeepSpeed launcher command for ``python -m twinflow.train`` and the extra environment.

    Without a GPU, 2 CPU ranks over gloo (``DS_ACCELERATOR=cpu``). ``--no_local_rank``: ranks read
    ``LOCAL_RANK`` from the environment the launcher sets, so the training script's arguments are only
    the config and its overrides.
    """
    env: dict[str, str] = {}
    if gpu_count == 0:
        env["DS_ACCELERATOR"] = "cpu"
    ranks = num_gpus if num_gpus is not None else (gpu_count or 2)
    if ranks < 1:
        raise CLIError(f"--num-gpus must be >= 1, got {ranks}")
    if gpu_count and ranks > gpu_count:
        raise CLIError(f"--num-gpus {ranks} but only {gpu_count} GPU(s) are visible")
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--num_nodes", "1", "--no_local_rank",
           "--module", "twinflow.train", "--config", str(config), *overrides]
    return cmd, env


def _run_train(args: argparse.Namespace) -> int:
    from twinflow.training.config import load_train_config

    # The whole config and the files it names, in this one process: a bad run fails here, with the key
    # named, before the launcher starts any rank.
    load_train_config(args.config, args.overrides, check_inputs=True)
    import shutil

    import torch

    cmd, env = launch_command(args.config, args.overrides, args.num_gpus, torch.cuda.device_count())
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"twinflow train: running: {(shown + ' ') if shown else ''}{shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return EXIT_OK
    if shutil.which(cmd[0]) is None:
        raise CLIError("the 'deepspeed' launcher is not on PATH; install DeepSpeed (see the README)")
    os.execvpe(cmd[0], cmd, {**os.environ, **env})  # replaces this process: no return


# ----------------------------------------------------------------------------------------- export


def _run_export(args: argparse.Namespace) -> int:
    main = _optional_entry_point("twinflow.training.export", "export")
    return int(main(args.args) or 0)


# ----------------------------------------------------------------------------------------- sample


def _configure_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the transformer: an exported folder (twinflow export) or a pipeline root")
    p.add_argument("--encoders", default=None,
                   help="the encoder folder (for Qwen-Image: text_encoder/, tokenizer/ and vae/; default: the one "
                        "the export records, else --model)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--preset", action="append", default=None,
                   help="sampler preset (repeatable; default: one_step few_step any_step multi_step)")
    p.add_argument("--output", default="samples", help="folder for the PNGs (default: ./samples)")
    p.add_argument("--height", type=int, default=None, help="default: the training image size the export records, else 512")
    p.add_argument("--width", type=int, default=None, help="default: as --height")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from twinflow.backbones.registry import backbone_spec, family_of_model_folder
    from twinflow.data.latent_codec import LatentCodec
    from twinflow.sampling import SAMPLER_PRESETS
    from twinflow.training.export import EXPORT_RECORD, read_export_record
    from twinflow.training.observability import SamplePrompts, write_sample_grids

    presets = args.preset or ["one_step", "few_step", "any_step", "multi_step"]
    unknown = [p for p in presets if p not in SAMPLER_PRESETS]
    if unknown:
        raise CLIError(f"unknown --preset {unknown}; choose from {sorted(SAMPLER_PRESETS)}")
    if not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model}: no such folder")
    # What the run trained with, as its export records it: backbone, encoders, latent codec, image size.
    record = read_export_record(args.model)
    # A folder written by something else (a published model) has no record: its diffusers class names the family.
    spec = backbone_spec(record.get("family") or family_of_model_folder(args.model), key=f"{EXPORT_RECORD}: family")
    recorded = record.get("sampling") or {}
    codec = LatentCodec.parse(recorded.get("latent_codec"))
    encoders = args.encoders or recorded.get("encoders") or args.model
    if not Path(encoders).is_dir():
        source = "--encoders" if args.encoders else f"the encoder folder recorded in {Path(args.model) / EXPORT_RECORD}"
        raise CLIError(f"{source} {encoders}: no such folder (pass --encoders)")
    height = args.height or recorded.get("image_size") or 512
    width = args.width or args.height or recorded.get("image_size") or 512
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    backbone = spec.load_for_sampling(args.model, dtype_name, device)
    conditioner = spec.conditioner_from_pretrained(encoders, dtype=getattr(torch, dtype_name), device=device)
    multiple = codec.size_multiple(conditioner)
    for key, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise CLIError(f"--{key} must be a positive multiple of {multiple} (latent codec {codec.name}), got {value}")
    shape = codec.latent_shape(height, width, conditioner)
    expected = backbone.latent_channels
    if shape[0] != expected:
        raise CLIError(f"the transformer expects {expected} latent channels but the latent codec {codec.name!r} "
                       f"(encoders {encoders}) gives {shape[0]}: pass the encoders the model was trained with")
    prompts = SamplePrompts(conditioner.encode_prompts(args.prompt), list(args.prompt), shape, codec.decoder(conditioner))
    written = write_sample_grids(args.output, "sample", backbone.eval(), prompts, presets, device=device, seed=args.seed)
    for path in written.values():
        print(path)
    return EXIT_OK


# ------------------------------------------------------------------------------------------- demo


def _configure_passthrough(p: argparse.ArgumentParser) -> None:
    p.epilog = "every argument after the subcommand is passed on unchanged"


def _run_demo(args: argparse.Namespace) -> int:
    main = _optional_entry_point("twinflow.demo.main", "demo")
    return int(main(args.args) or 0)


def _optional_entry_point(module: str, what: str) -> Callable[[list[str]], int | None]:
    """``module.main``, imported on use; a clear error when this checkout does not have it."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise CLIError(f"'{what}' is not available in this installation ({module} is missing)") from e
        raise
    main = getattr(mod, "main", None)
    if main is None:
        raise CLIError(f"'{what}' is not available in this installation ({module} has no main())")
    return main


register(Subcommand("memory-plan", "per-GPU memory budget of a training config under ZeRO-3; exit 1 if it does not fit",
                    _configure_memory_plan, _run_memory_plan, one_line_errors=True))
register(Subcommand("train", "launch training with the DeepSpeed launcher (all GPUs, or 2 CPU ranks)",
                    _configure_train, _run_train))
register(Subcommand("export", "export a checkpoint as a diffusers model folder", _configure_passthrough, _run_export,
                    passthrough=True, one_line_errors=True))
register(Subcommand("sample", "sample PNGs from an exported model folder", _configure_sample, _run_sample,
                    one_line_errors=True))
register(Subcommand("demo", "run the end-to-end demo", _configure_passthrough, _run_demo, passthrough=True))
register(Subcommand("env", "versions, accelerator and the import check (attach to bug reports)", _configure_passthrough,
                    lambda args: int(_optional_entry_point("twinflow.env", "env")(args.args) or 0), passthrough=True))


# ------------------------------------------------------------------------------------------- main


USER_FACING_ERRORS = (("twinflow.data.stats", "DataError"), ("twinflow.training.export", "ExportError"))
"""Other components' exceptions whose message is meant for the user (unusable data, impossible export)."""


def _is_user_facing(error: Exception) -> bool:
    """Whether ``error`` is one of :data:`USER_FACING_ERRORS`, looked up only in modules already
    imported (a subcommand that raised one has imported its module; nothing is imported here)."""
    for module, name in USER_FACING_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinflow", description="TwinFlow training and sampling for Qwen-Image.")
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for command in SUBCOMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help,
                                    add_help=not command.passthrough)
        command.configure(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twinflow`` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command: Subcommand = args._command
    if command.passthrough:
        args.args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return command.run(args)
    except (ConfigError, CLIError, FileNotFoundError) as e:
        print(f"twinflow {command.name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if _is_user_facing(e):
            print(f"twinflow {command.name}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not command.one_line_errors or os.environ.get("TWINFLOW_TRACEBACK") == "1":
            raise
        message = " ".join(str(e).split()) or "(no message)"
        print(f"twinflow {command.name}: error: {type(e).__name__}: {message} "
              "(TWINFLOW_TRACEBACK=1 shows where)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
