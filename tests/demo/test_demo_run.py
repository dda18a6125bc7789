"""The demo end to end at smoke size: inputs, two launcher runs, export, sampling, scoring, files.

The same code path as ``make demo``, with 2 optimizer steps per stage (flow-matching pretraining, then
TwinFlow and flow matching from its export) and a small dataset: it proves the plumbing (three DeepSpeed
launches on 2 CPU ranks, loading a pretrained checkpoint into ZeRO-3 partitions, cache, online and EMA
exports, evaluation), not the quality.
"""
import json
import subprocess
import sys

import pytest

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
