"""``twinflow env`` (or ``python -m twinflow.env``): what this installation runs on, for bug reports and
benchmark records.

Prints the versions of the packages the trainer depends on, the accelerator, and an import check: it
imports transformers' ``PreTrainedModel`` (which, from transformers 5.25 on, imports Hugging Face's
``kernels`` distribution eagerly) and our ``twinflow.kernels``, and reports where the top-level name
``kernels`` resolved. From any working directory that must be Hugging Face's package (or nothing), never
this repository's ``kernels/`` folder; the check fails (exit 1) otherwise.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any, Sequence

PACKAGES = ("torch", "triton", "diffusers", "transformers", "kernels", "peft", "deepspeed", "safetensors",
            "accelerate", "flash-attn", "numpy", "twinflow")
OUR_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def import_check() -> dict[str, Any]:
    """Import what a training process imports and report where ``kernels`` and ``twinflow.kernels``
    came from; ``ok`` is false when our folder was imported under the top-level name."""
    from transformers import PreTrainedModel  # noqa: F401  (imports Hugging Face's kernels when installed)
    # diffusers' LoRA loader imports transformers' hub-kernels integration, which probes the name
    # ``kernels`` by importing it (transformers < 5.25): the path the first GPU benchmark broke on.
    import diffusers.loaders.peft  # noqa: F401

    import twinflow.kernels.dual_time_embedding as dte

    top = sys.modules.get("kernels")
    top_file = getattr(top, "__file__", None) if top is not None else None
    shadowed = top_file is not None and Path(top_file).resolve().parent == OUR_KERNELS.resolve()
    return {
        "ok": not shadowed and dte.__name__ == "twinflow.kernels.dual_time_embedding",
        "kernels_module": top_file,
        "twinflow_kernels_module": dte.__file__,
        "sys_path_0": sys.path[0] if sys.path else None,
    }


def accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda})"
    return "cpu (no CUDA device)"


def report() -> dict[str, Any]:
    import platform

    return {"python": platform.python_version(), "platform": platform.platform(), "accelerator": accelerator(),
            "versions": versions(), "imports": import_check()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinflow env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    info = report()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"python       {info['python']} ({info['platform']})")
        print(f"accelerator  {info['accelerator']}")
        for name, version in info["versions"].items():
            print(f"{name:12s} {version or '-'}")
        imports = info["imports"]
        print(f"import check {'ok' if imports['ok'] else 'FAILED'}: top-level kernels -> {imports['kernels_module']}; "
              f"twinflow.kernels -> {Path(imports['twinflow_kernels_module']).parent}")
    return 0 if info["imports"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
