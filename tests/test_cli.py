"""The ``twinflow`` command: clean errors (exit 2, one line, no traceback), the launcher command it builds,
the subcommand registry, and ``sample`` end to end on a tiny exported model folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from twinflow import cli

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinflow.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_unknown_subcommand_is_a_usage_error():
    result = _run("no-such-command")
    assert result.returncode == 2
    assert "invalid choice: 'no-such-command'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named_without_a_traceback():
    result = _run("memory-plan", "--config", "configs/does_not_exist.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == "twinflow memory-plan: error: config file not found: configs/does_not_exist.yaml"


def test_bad_config_key_is_named(capsys):
    assert cli.main(["memory-plan", "--config", str(TINY_CONFIG), "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "'train.no_such_key'" in err and "Traceback" not in err


def test_train_prints_and_builds_the_launcher_command(capsys):
    assert cli.main(["train", "--config", str(TINY_CONFIG), "--dry-run", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    # This machine has no GPU: two CPU ranks.
    assert f"DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --num_nodes 1 --no_local_rank --module twinflow.train " \
           f"--config {TINY_CONFIG} train.max_steps=2" in out

    cmd, env = cli.launch_command("c.yaml", [], None, gpu_count=4)
    assert cmd[:3] == ["deepspeed", "--num_gpus", "4"] and env == {}
    with pytest.raises(cli.CLIError, match="only 4 GPU"):
        cli.launch_command("c.yaml", [], 8, gpu_count=4)


def test_registry_dispatches_and_refuses_duplicates(capsys):
    seen = []
    command = cli.Subcommand("echo-test", "test", lambda p: p.add_argument("word"), lambda a: seen.append(a.word) or 7)
    cli.register(command)
    try:
        with pytest.raises(ValueError, match="already registered"):
            cli.register(command)
        assert cli.main(["echo-test", "hello"]) == 7
        assert seen == ["hello"]
    finally:
        del cli.SUBCOMMANDS["echo-test"]


def test_export_errors_are_clean(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twinflow export: error: ") and str(tmp_path / "none") in err


def test_optional_components_fail_clearly_when_absent():
    with pytest.raises(cli.CLIError, match=r"'export' is not available .*twinflow\.no_such_module is missing"):
        cli._optional_entry_point("twinflow.no_such_module", "export")
    with pytest.raises(cli.CLIError, match="has no main"):
        cli._optional_entry_point("twinflow.utils.typed_config", "demo")


def test_passthrough_commands_hand_on_every_argument(capsys):
    seen = []
    cli.register(cli.Subcommand("pass-test", "test", lambda p: None, lambda a: seen.append(a.args) or 0, passthrough=True))
    try:
        assert cli.main(["pass-test", "--help", "--fast", "x"]) == 0
        assert seen == [["--help", "--fast", "x"]]
    finally:
        del cli.SUBCOMMANDS["pass-test"]
    with pytest.raises(SystemExit):
        cli.main(["memory-plan", "--config", "c.yaml", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_sample_writes_one_grid_per_preset(tmp_path, capsys):
    from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
    from twinflow.backbones.qwen_image.tiny_encoders import save_tiny_model_folder
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

    encoders = save_tiny_model_folder(tmp_path / "base")
    exported = tmp_path / "export"  # the layout `twinflow export` writes: the transformer folder itself
    TwinFlowQwenImageTransformer(**tiny_transformer_config()).save_pretrained(exported)
    out = tmp_path / "out"
    code = cli.main(["sample", "--model", str(exported), "--encoders", str(encoders),
                     "--prompt", "a red cat", "--prompt", "a dog",
                     "--preset", "one_step", "--preset", "few_step", "--height", "64", "--width", "64",
                     "--output", str(out)])
    assert code == 0
    paths = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert [Path(p).name for p in paths] == ["sample_one_step.png", "sample_few_step.png"]
    for path, nfe in zip(paths, (1, 2)):
        with Image.open(path) as grid:
            meta = json.loads(grid.text["twinflow"])
        assert meta["nfe"] == nfe and meta["captions"] == ["a red cat", "a dog"]

    assert cli.main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
