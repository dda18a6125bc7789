"""Config fuzz: malformed inputs to ``twinflow train`` and ``python -m twinflow.train``.

For every row, both entry points must answer with exit code 2 and ONE stderr line that names the key
(or file), and start nothing: ``twinflow train`` never execs the DeepSpeed launcher and the module
entry point never joins a process group. The rows: unknown and misspelled keys at every level, wrong
types, NaN and inf for EVERY float key of the training config (found by walking the dataclasses),
out-of-range values, empty lists, model shapes against data shapes, and missing files. Both entry points
are called in this process (they check the config before anything heavy), plus a subprocess of each
for the real console paths.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import types
import typing

import pytest
import torch.distributed as dist

import twinflow.cli as cli
import twinflow.train as train_entry
from twinflow.training.config import TrainConfig, load_train_config
from twinflow.utils.typed_config import to_dict

from cache_helpers import REPO, TINY, cache_config, write_cache


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def float_keys(cls, values: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, a value with a non-finite number in it) for every float field under ``cls``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key, current = _strip_optional(hints[f.name]), prefix + f.name, (values or {}).get(f.name)
        if hasattr(tp, "select_config_type"):  # the model section: its family's dataclass
            tp = tp.select_config_type(current or {}, key)
        if dataclasses.is_dataclass(tp):
            out += float_keys(tp, current, key + ".")
        elif tp is float:
            out.append((key, None))
        elif typing.get_origin(tp) in (tuple, list) and float in typing.get_args(tp):
            out.append((f"{key}[0]", list(current)))
    return out


TINY_VALUES = to_dict(load_train_config(TINY))
FLOAT_KEYS = float_keys(TrainConfig, TINY_VALUES)


def _nonfinite_rows() -> list:
    rows = []
    for key, sequence in FLOAT_KEYS:
        for text in (".nan", ".inf", "-.inf"):
            if sequence is None:
                rows.append(pytest.param([f"{key}={text}"], [key, "finite"], id=f"{key}={text}"))
            else:
                name = key[: -len("[0]")]
                value = "[" + ", ".join([text] + [str(v) for v in sequence[1:]]) + "]"
                rows.append(pytest.param([f"{name}={value}"], [key, "finite"], id=f"{name}={value}"))
    return rows


ROWS = [
    # unknown and misspelled keys, at every level
    (["optimm.lr=1"], ["'optimm'"]),
    (["optim.learning_rate=1"], ["'optim.learning_rate'"]),
    (["method.probs.advv=1"], ["'method.probs.advv'"]),
    (["method.loss_func.alpah=1"], ["'method.loss_func.alpah'"]),
    (["model.transformer.num_layer=2"], ["'model.transformer.num_layer'", "num_layers"]),
    (["model.transformer.kernels=eager"], ["'model.transformer.kernels'"]),
    (["model.lora.rnak=4"], ["'model.lora.rnak'"]),
    (["train.save_evry=1"], ["'train.save_evry'"]),
    (["deepspeed.zero_stag=3"], ["'deepspeed.zero_stag'"]),
    (["sampling.prompt=[a]"], ["'sampling.prompt'"]),
    (["synthetic_data.latent_chanels=4"], ["'synthetic_data.latent_chanels'"]),
    (["faults.kill_step=1"], ["'faults.kill_step'"]),
    # keys the trainer owns, set through deepspeed.extra
    (["deepspeed.extra={optimizer: {type: Adam}}"], ["deepspeed.extra.optimizer"]),
    (["deepspeed.extra={zero_optimization: {stage: 2}}"], ["deepspeed.extra.zero_optimization.stage"]),
    (["deepspeed.extra={gradient_clipping: 0.5}"], ["deepspeed.extra.gradient_clipping"]),
    # wrong types
    (["optim.lr=fast"], ["'optim.lr'", "expected a number"]),
    (["train.max_steps=1.5"], ["'train.max_steps'", "integer"]),
    (["train.save_final=maybe"], ["'train.save_final'"]),
    (["optim.betas=0.9"], ["'optim.betas'", "list"]),
    (["sampling.prompts=hello"], ["'sampling.prompts'", "list"]),
    (["model.transformer=5"], ["'model.transformer'"]),
    (["model.transformer.num_layers=two"], ["'model.transformer.num_layers'"]),
    (["model.transformer.axes_dims_rope=[4, 6]"], ["'model.transformer.axes_dims_rope'"]),
    (["train=3"], ["'train'", "mapping"]),
    (["kernels=cuda"], ["'kernels'"]),
    (["method.preset=fastest"], ["'method.preset'"]),
    (["deepspeed.dist_backend=mpi"], ["'deepspeed.dist_backend'"]),
    # out of range
    (["optim.lr=0"], ["'optim.lr'", "> 0"]),
    (["optim.lr=-1e-4"], ["'optim.lr'"]),
    (["optim.betas=[0.9, 1.0]"], ["'optim.betas'"]),
    (["optim.eps=0"], ["'optim.eps'"]),
    (["optim.min_lr_ratio=2"], ["'optim.min_lr_ratio'"]),
    (["optim.weight_decay=-0.1"], ["'optim.weight_decay'"]),
    (["optim.gradient_accumulation_steps=0"], ["'optim.gradient_accumulation_steps'"]),
    (["method.enhanced_range=[-3, 7]"], ["'method'", "enhanced_range"]),
    (["method.enhanced_range=[0.8, 0.2]"], ["'method'", "enhanced_range"]),
    (["method.probs.adv=-1"], ["'method.probs'", "adv"]),
    (["method.probs={e2e: 0, mul: 0, any: 0, adv: 0, one: 0}"], ["'method.probs'", "positive weight"]),
    (["method.ema_decay_rate=1.5"], ["'method'", "ema_decay_rate"]),
    (["method.consistc_ratio=-0.5"], ["'method'", "consistc_ratio"]),
    (["method.dist_match_cof=-1"], ["'method'", "dist_match_cof"]),
    (["method.enhanced_ratio=-1"], ["'method'", "enhanced_ratio"]),
    (["method.rcgm_delta=0"], ["'method'", "rcgm_delta"]),
    (["method.time_dist_ctrl=[1, 1, 2]"], ["'method'", "time_dist_ctrl"]),
    (["method.loss_func.c=0"], ["'method.loss_func'", "c must be > 0"]),
    (["method.estimate_order=-1"], ["'method'", "estimate_order"]),
    (["model.lora.rank=0"], ["'model.lora.rank'"]),
    (["model.lora.dropout=1"], ["'model.lora.dropout'"]),
    (["model.transformer.patch_size=0"], ["'model.transformer.patch_size'"]),
    (["train.micro_batch_size=0"], ["'train.micro_batch_size'"]),
    (["train.micro_batch_size=2"], ["'train.micro_batch_size'", "active method groups"]),
    (["train.max_steps=0"], ["'train.max_steps'"]),
    (["train.keep_last=0"], ["'train.keep_last'"]),
    (["train.save_every=-1"], ["'train.save_every'"]),
    (["train.output_dir="], ["'train.output_dir'"]),
    (["deepspeed.zero_stage=2"], ["'deepspeed.zero_stage'"]),
    (["sampling.height=40"], ["'sampling.height'"]),
    (["sampling.presets=[warp]"], ["'sampling.presets[0]'"]),
    (["synthetic_data.num_items=0"], ["'synthetic_data.num_items'"]),
    (["synthetic_data.latent_size=3"], ["'synthetic_data.latent_size'"]),
    (["synthetic_data.text_dim=0"], ["'synthetic_data.text_dim'"]),
    (["model.dtype=bfloat16"], ["'model.dtype'"]),
    # model shapes against data shapes
    (["synthetic_data.latent_channels=3"], ["'synthetic_data.latent_channels'", "takes 4"]),
    (["model.transformer.in_channels=12"], ["'synthetic_data.latent_channels'", "takes 3"]),
    (["synthetic_data.text_dim=24"], ["'synthetic_data.text_dim'", "32"]),
    # empty lists
    (["sampling.prompts=[]", "train.sample_every=2"], ["'sampling.prompts'", "empty"]),
    (["sampling.presets=[]", "train.sample_every=2"], ["'sampling.presets'", "empty"]),
    (["model.lora.target_modules=[]"], ["'model.lora.target_modules'"]),
    (["optim.betas=[]"], ["'optim.betas'"]),
    # missing files
    (["train.resume=/nonexistent/step_00000004"], ["'train.resume'", "/nonexistent/step_00000004"]),
    (["model.transformer=null", "model.pretrained=/nonexistent/qwen"], ["'model.pretrained'", "/nonexistent/qwen"]),
    # sections: both data sources, or neither
    (["synthetic_data=null"], ["'data'", "'synthetic_data'"]),
]

CACHE_ROWS = [  # on a cache-reading config (tests/training/cache_helpers.py)
    (["data.cache_dir=/nonexistent/cache"], ["'data.cache_dir'", "/nonexistent/cache/manifest.json"]),
    (["data.image_size=512"], ["'data.cache_dir'", "image_size: cache has 64, config has 512"]),
    (["data.source=parquet"], ["'data.cache_dir'", "source: cache has 'folder'"]),
    (["data.paths=[]"], ["'data'", "paths"]),
    (["data.image_size=.nan"], ["'data.image_size'"]),
    (["data.max_image_pixels=0"], ["'data'", "max_image_pixels"]),
    (["data.use_cache=false"], ["'data.use_cache'"]),
    (["data.sourse=folder"], ["'data.sourse'"]),
    (["model.transformer.in_channels=12"], ["'data.cache_dir", "4 latent channels", "takes 3"]),  # the cache has 4
    (["model.transformer.joint_attention_dim=24"], ["'data.cache_dir", "width 32", "takes 24"]),
    (["model.edit=true"], ["model.edit"]),
    (["train.sample_every=1"], ["'train.sample_every'", "text encoder"]),  # the cache's encoder folder is absent
]


@pytest.fixture(scope="module")
def cache_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return cache_config(root, write_cache(root))


def _answers(config, overrides, capsys, monkeypatch) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of ``twinflow train`` and ``python -m twinflow.train``, in process."""
    def no_launcher(*args):
        raise AssertionError(f"the launcher was started: {args}")

    monkeypatch.setattr(os, "execvpe", no_launcher)
    monkeypatch.delenv("RANK", raising=False)
    answers = []
    for call in (lambda: cli.main(["train", "--config", str(config), *overrides]),
                 lambda: train_entry.main(["--config", str(config), *overrides])):
        code = call()
        out, err = capsys.readouterr()
        answers.append((code, out, err))
        assert not dist.is_initialized(), "a process group was started"
    return answers


def _check(answers, expected: list[str]) -> None:
    for code, out, err in answers:
        lines = err.strip().splitlines()
        assert code == 2, (code, err)
        assert len(lines) == 1, err
        assert "running:" not in out and "deepspeed" not in out
        for part in expected:
            assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("overrides,expected", _nonfinite_rows())
def test_nonfinite_numbers_are_refused(overrides, expected, capsys, monkeypatch):
    _check(_answers(TINY, overrides, capsys, monkeypatch), expected)


def test_every_float_key_is_in_the_table():
    keys = {k for k, _ in FLOAT_KEYS}
    assert {"optim.lr", "optim.max_grad_norm", "method.probs.adv", "method.enhanced_range[0]", "model.lora.alpha",
            "method.loss_func.c", "optim.betas[0]"} <= keys
    assert len(keys) >= 20


@pytest.mark.parametrize("overrides,expected", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_malformed_settings_are_refused(overrides, expected, capsys, monkeypatch):
    _check(_answers(TINY, overrides, capsys, monkeypatch), expected)


@pytest.mark.parametrize("overrides,expected", CACHE_ROWS, ids=[" ".join(r[0]) for r in CACHE_ROWS])
def test_malformed_cache_settings_are_refused(cache_yaml, overrides, expected, capsys, monkeypatch):
    _check(_answers(cache_yaml, overrides, capsys, monkeypatch), expected)


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    _check(_answers(tmp_path / "nope.yaml", [], capsys, monkeypatch), ["config file not found", "nope.yaml"])


def test_the_good_configs_pass(cache_yaml):
    load_train_config(TINY, check_inputs=True)
    load_train_config(cache_yaml, check_inputs=True)


def test_only_rank_zero_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert train_entry.main(["--config", str(TINY), "optim.lr=.nan"]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("entry", [["-m", "twinflow.cli", "train"], ["-m", "twinflow.train"]], ids=["twinflow-train", "module"])
def test_subprocess_fails_fast_with_one_line_and_no_launcher(entry):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *entry, "--config", str(TINY), "train.resume=/nonexistent/ckpt"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "twinflow train: error: config key 'train.resume': /nonexistent/ckpt does not exist"]
    assert "running:" not in proc.stdout and "[launch" not in proc.stdout + proc.stderr
    assert elapsed < 60, elapsed  # a few seconds on an idle machine: no rank, no DeepSpeed start-up
