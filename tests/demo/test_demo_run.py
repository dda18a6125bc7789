"""The demo end to end at smoke size: inputs, two launcher runs, export, sampling, scoring, files.

The same code path as ``make demo``, with 2 optimizer steps per stage (flow-matching pretraining, then
TwinFlow and flow matching from its export) and a small dataset: it proves the plumbing (three DeepSpeed
launches on 2 CPU ranks, loading a pretrained checkpoint into ZeRO-3 partitions, cache, online and EMA
exports, evaluation), not the quality.
"""
import json
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.distributed


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "twinflow.cli", "demo", "--out", str(out), "--steps", "2", "--items", "128",
         "--samples-per-prompt", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"twinflow", "twinflow_ema", "flow_matching", "flow_matching_ema"}
    for method in metrics["scores"]:
        scores = metrics["scores"][method]
        assert [scores[k]["nfe"] for k in ("1nfe", "2nfe", "4nfe_any", "30nfe_multi")] == [1, 2, 4, 30]
        for label in scores:
            assert (out / "samples" / f"{method}_{label}.png").is_file()
        assert (out / "export" / method).is_dir()
    assert (out / "loss_curve.png").is_file()
    assert "metrics:" in proc.stdout and str(out / "metrics.json") in proc.stdout

    # The comparison figure: 12 prompts x 6 settings (TwinFlow 1/2/4/30 NFE, flow matching 1/30 NFE),
    # 32 px samples shown at 3x with 4 px gaps, a 190 px caption column and a 34 px header row.
    from twinflow.demo.main import COMPARISON

    assert len(COMPARISON) == 6
    assert Image.open(out / "comparison.png").size == (190 + 6 * (96 + 4), 34 + 12 * (96 + 4))

    # The printed sample command draws from the EMA export with the prompt alone: the export records
    # the encoders, the pixel-fold codec and the 32 px image size.
    printed = proc.stdout.strip().splitlines()[-1].strip()
    assert printed.startswith("twinflow sample --model ") and "--encoders" not in printed and "--height" not in printed
    args = shlex.split(printed)[1:]
    sampled = subprocess.run([sys.executable, "-m", "twinflow.cli", *args], capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    grids = [line for line in sampled.stdout.splitlines() if line.endswith(".png")]
    assert len(grids) == 4 and all(Image.open(g).size[0] > 0 for g in grids)

    # A copy without the record falls back to the VAE codec of --encoders: the tiny Qwen-Image VAE has 4
    # latent channels, the demo model 48. One line naming both numbers, no traceback.
    bare = tmp_path / "bare_export"
    shutil.copytree(out / "export" / "twinflow_ema", bare)
    (bare / "twinflow_export.json").unlink()
    wrong = subprocess.run([sys.executable, "-m", "twinflow.cli", "sample", "--model", str(bare), "--encoders",
                            str(out / "models" / "conditioner"), "--prompt", "x", "--height", "32"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    message = [line for line in wrong.stderr.splitlines() if "error" in line.lower()]  # besides loading progress bars
    assert "Traceback" not in wrong.stderr, wrong.stderr
    assert len(message) == 1 and message[0].startswith("twinflow sample: error: "), wrong.stderr
    assert "expects 48 latent channels" in message[0] and "gives 4" in message[0], wrong.stderr


def test_demo_reports_a_missing_launcher_without_a_traceback(tmp_path, monkeypatch):
    from twinflow.demo import main as demo

    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    assert demo.main(["--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("ranks, micro", [(1, 32), (2, 16), (8, 4), (16, 4)])
def test_demo_keeps_the_global_batch_it_was_tuned_with(ranks, micro):
    from twinflow.demo.main import GLOBAL_BATCH, micro_batch_size

    assert GLOBAL_BATCH == 32
    assert micro_batch_size(ranks) == micro


def test_demo_launch_command_sets_the_micro_batch_before_user_overrides(tmp_path, monkeypatch):
    from twinflow.demo import main as demo

    seen = {}

    class FakeProc:
        stdout = iter(["train: 1/1\n"])
        returncode = 0

        def wait(self):
            return 0

    def fake_popen(cmd, env, **kwargs):
        seen["cmd"], seen["env"] = cmd, env
        return FakeProc()

    monkeypatch.setattr(demo.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(demo.subprocess, "Popen", fake_popen)
    demo.launch(tmp_path / "c.yaml", ["train.micro_batch_size=8"], tmp_path / "log.txt")
    cmd = seen["cmd"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and seen["env"]["DS_ACCELERATOR"] == "cpu"
    sizes = [a for a in cmd if a.startswith("train.micro_batch_size=")]
    assert sizes == ["train.micro_batch_size=16", "train.micro_batch_size=8"]  # the later one wins
