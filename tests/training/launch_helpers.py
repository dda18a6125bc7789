"""What the backbones' 2-rank launch tests (``test_z_image_launch.py``, ``test_openuni_launch.py``) do alike:
run a module, and train straight / resume from the middle / export / sample at every preset."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_distributed import ENV, _losses, _tail, launch

REPO = Path(__file__).resolve().parents[2]
PRESETS = ["one_step", "few_step", "any_step", "multi_step"]  # 1, 2, 4 and 30 NFE


def run_module(args: list[str], log: Path) -> None:
    """``python -m <args>`` in the repository, output to ``log``; asserts success (the log's tail if not)."""
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                            timeout=900).returncode
    assert rc == 0, _tail(log)


def tiny_parquet_data(root: Path, image_px: int, image_size: int) -> dict:
    """Eight captioned ``image_px`` images as ``root/raw/train.parquet``; the ``data`` section of a cache of
    them at ``image_size`` under ``root/cache``."""
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from data_helpers import image_bytes, write_parquet

    (root / "raw").mkdir()
    rows = [{"caption": f"a photo of item {i}", "image": image_bytes(i, (image_px, image_px))} for i in range(8)]
    write_parquet(root / "raw" / "train.parquet", rows)
    return {"source": "parquet", "paths": [str(root / "raw")], "image_size": image_size, "use_cache": True,
            "cache_dir": str(root / "cache"), "cache_dtype": "float32"}


def precompute(root: Path, name: str, family: str, data: dict, encoder: dict) -> None:
    """``python -m twinflow.data.precompute`` of ``data`` with ``family``'s ``encoder`` section on the CPU."""
    job = {"model": {"family": family}, "data": data, "precompute": {"batch_size": 4, "shard_size": 4, "device": "cpu"},
           "encoder": encoder}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(job))
    run_module(["twinflow.data.precompute", "--config", str(root / f"{name}.yaml"), "--no-progress"], root / f"{name}.log")


def train_resume_export_sample(config: Path, out: Path, overrides: list[str], export_args: list[str],
                               height: int) -> dict:
    """Four steps straight, the same resumed from step 2, an export of step 4 (``twinflow export``) and
    ``twinflow sample`` of it at every preset. Returns the losses, the export folder, the sample names and
    the last checkpoint."""
    base = ["--module", "twinflow.train", "--config", str(config), *overrides]
    assert launch(base + [f"train.output_dir={out / 'straight'}"], out / "straight.log") == 0, _tail(out / "straight.log")
    resume = out / "straight" / "checkpoints" / "step_00000002"
    assert launch(base + [f"train.output_dir={out / 'resumed'}", f"train.resume={resume}"], out / "resumed.log") == 0, \
        _tail(out / "resumed.log")
    checkpoint = out / "straight" / "checkpoints" / "step_00000004"
    export = out / "export"
    run_module(["twinflow.cli", "export", "--checkpoint", str(checkpoint), "--out", str(export), *export_args],
               out / "export.log")
    samples = out / "samples"
    run_module(["twinflow.cli", "sample", "--model", str(export), "--prompt", "a red cat", "--height", str(height),
                "--device", "cpu", "--output", str(samples), *[a for p in PRESETS for a in ("--preset", p)]],
               out / "sample.log")
    return {"straight": _losses(out / "straight" / "metrics.jsonl"), "resumed": _losses(out / "resumed" / "metrics.jsonl"),
            "export": export, "samples": sorted(p.name for p in samples.glob("*.png")), "checkpoint": checkpoint}


def check_resume(run: dict) -> None:
    """The resumed run's steps 3 and 4 have the straight run's losses."""
    assert sorted(run["straight"]) == [1, 2, 3, 4] and sorted(run["resumed"]) == [3, 4]
    for step, values in run["resumed"].items():
        assert values[0] == pytest.approx(run["straight"][step][0], rel=1e-5, abs=1e-6), step
