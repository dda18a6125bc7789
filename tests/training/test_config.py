"""The trainer's typed config: strict loading, cross-section checks, and the shipped YAML files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.training.config import TrainConfig, load_train_config
from twinflow.utils.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_every_shipped_config_loads():
    assert {p.name for p in CONFIGS} >= {
        "tiny_cpu.yaml", "tiny_cpu_lora.yaml", "qwen_image_full.yaml", "qwen_image_lora_1order.yaml", "qwen_image_lora_2order.yaml",
        "qwen_image_edit.yaml",
    }
    for path in CONFIGS:
        assert isinstance(load_train_config(path), TrainConfig), path


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "tiny_cpu_lora.yaml"])
def test_tiny_configs_use_the_tiny_transformer(name):
    section = yaml.safe_load((REPO / "configs" / name).read_text())["model"]["transformer"]
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_transformer_config().items()}
    assert section == expected


def test_production_configs_match_the_method_table():
    full = load_train_config(REPO / "configs" / "qwen_image_full.yaml")
    assert full.deepspeed.zero_stage == 3 and full.deepspeed.bf16 and full.model.gradient_checkpointing
    assert 0 < full.method.ema_decay_rate < 1 and full.data.use_cache
    one = load_train_config(REPO / "configs" / "qwen_image_lora_1order.yaml")
    assert one.model.lora.enabled and one.method.estimate_order == 1
    assert one.method.probs.as_dict() == {"e2e": 1.0, "mul": 1.0, "any": 0.0, "adv": 1.0, "one": 1.0}
    two = load_train_config(REPO / "configs" / "qwen_image_lora_2order.yaml")
    assert two.model.lora.enabled and two.method.estimate_order == 2
    edit = load_train_config(REPO / "configs" / "qwen_image_edit.yaml")
    assert edit.model.edit and edit.data.has_reference


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("train.micro_bach_size=4", "train.micro_bach_size"),
        ("deepspeed.zero_stag=3", "deepspeed.zero_stag"),
        ("method.probs.ee2=1", "method.probs.ee2"),
        ("sampling.prompt=[a]", "sampling.prompt"),
        ("bogus=1", "bogus"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_train_config(TINY, [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=fast", "optim.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("optim.schedule=exponential", "optim.schedule"),
        ("kernels=cuda", "kernels"),
        ("deepspeed.bf16=sometimes", "deepspeed.bf16"),
    ],
)
def test_mistyped_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_train_config(TINY, [override])


def test_micro_batch_smaller_than_active_groups_fails_at_load():
    # TwinFlow has four active groups (e2e, mul, any, adv): a micro batch of 3 cannot feed them all.
    with pytest.raises(ConfigError, match="train.micro_batch_size.*4 active method groups"):
        load_train_config(TINY, ["train.micro_batch_size=3"])
    assert load_train_config(TINY, ["train.micro_batch_size=3", "method.preset=rcgm_practice"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["deepspeed.zero_stage=2"], "deepspeed.zero_stage"),
        (["deepspeed.bf16=true"], "model.dtype"),
        (["data={source: folder, paths: [x], use_cache: true, cache_dir: c}"], "exactly one of config sections"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas"),
        (["train.keep_last=0"], "train.keep_last"),
        (["sampling.presets=[two_step]"], r"sampling.presets\[0\]"),
        (["model.edit=true"], "model.edit"),
        (["synthetic_data.edit=true"], "model.edit"),
    ],
)
def test_cross_section_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(TINY, overrides)


PROMPTS = ["synthetic_data=null", "data={source: prompts, paths: [prompts.txt], use_cache: true, cache_dir: c}"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ([], r"config key 'data.source' is 'prompts' .* but method.use_image_free is false"),
        (["method.use_image_free=true", "data.image_column=image"], "data.image_column set, but data.source: prompts has no images"),
        (["method.use_image_free=true", "data.ref_suffix=_ref"], "data.ref_suffix set, but data.source: prompts"),
    ],
)
def test_a_prompts_source_trains_image_free_and_takes_no_image_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(TINY, PROMPTS + overrides)
    config = load_train_config(TINY, PROMPTS + ["method.use_image_free=true"])  # no file is read at load
    assert config.data.prompts_only and config.data.image_column is None


def test_kernels_switch_reaches_method_and_model():
    config = load_train_config(TINY, ["kernels=triton"])
    assert config.method.kernels == "triton" and config.model.kernels == "triton"
    config = load_train_config(TINY, ["kernels=eager"])
    assert config.method.kernels == "eager" and config.model.kernels == "eager"


def test_launcher_entry_point_reports_config_errors(tmp_path):
    """``python -m twinflow.train`` exits with status 2 and names the key, before any rank starts."""
    proc = subprocess.run(
        [sys.executable, "-m", "twinflow.train", "--config", str(TINY), "--local_rank=0", "optim.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "'optim.lrr'" in proc.stderr


@pytest.mark.parametrize("value, fixed", [
    ("9.0a", "9.0"),
    ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
    ("9.0 9.0a 10.0f", "9.0;10.0"),
    ("8.0;9.0", None),  # already readable: left alone
    ("", None),
    (None, None),
])
def test_cuda_arch_list_is_made_readable_for_deepspeeds_op_builder(value, fixed):
    """An H200 image sets TORCH_CUDA_ARCH_LIST with '9.0a'; DeepSpeed 0.19.8's JIT builder then dies
    creating FusedAdam (int('0a')). The rewritten list must parse the way that builder parses it."""
    from twinflow.training.deepspeed_config import deepspeed_arch_list, prepare_jit_environment

    assert deepspeed_arch_list(value) == fixed
    env = {} if value is None else {"TORCH_CUDA_ARCH_LIST": value}
    assert prepare_jit_environment(env) == fixed
    readable = env.get("TORCH_CUDA_ARCH_LIST", "")
    for cc in [c for c in readable.replace(" ", ";").split(";") if c]:
        tuple(int(part.split("+")[0]) for part in cc.split("."))  # DeepSpeed's sort key
