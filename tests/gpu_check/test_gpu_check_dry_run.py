"""CI's dry run of the prepared GPU check (``benchmarks/gpu/check.sh``): every part runs what it can
without a GPU. ``setup`` builds and installs this package into a scratch folder and writes the
environment report from there; ``kernels`` collects the cuda-marked tests against that install;
``train`` prints its six launches (straight, killed, resumed for each optimizer); ``bench`` must refuse to measure without a GPU (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_part_of_the_gpu_check_runs_dry(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_SITE": str(site), "GPU_CHECK_DRY_RUN": "1",
           "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text().splitlines()
    logs = {p.stem: p.read_text()[-2000:] for p in out.glob("*.log")}
    assert proc.returncode == 0, (summary, logs)
    assert [line.split()[1] for line in summary] == ["setup:", "kernels:", "train:", "bench:"]
    assert all("rc=0" in line and "(ok)" in line for line in summary), summary
    report = json.loads((out / "env.json").read_text())
    assert report["imports"]["ok"] and report["imports"]["twinflow_kernels_module"].startswith(str(site))
    assert "tests collected" in logs["kernels"] and "cuda" in logs["kernels"]
    launches = [line for line in (out / "train.log").read_text().splitlines() if "deepspeed.launcher.runner" in line]
    assert len(launches) == 6 and sum("faults.kill_at_step=5" in line for line in launches) == 2
    assert "nothing measured" in logs["bench"]
