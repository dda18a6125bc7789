"""Small trainer components without a process group: LR schedule, DeepSpeed config, synthetic data."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
import torch

from twinflow.data.loader import ResumableLoader
from twinflow.training.config import OptimConfig, load_train_config
from twinflow.training.data import SyntheticDataConfig, SyntheticDataset
from twinflow.training.deepspeed_config import build_deepspeed_config
from twinflow.training.lr_schedule import WarmupDecaySchedule, lr_multiplier
from twinflow.utils.typed_config import ConfigError

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def test_lr_multiplier_warmup_then_decay():
    cosine = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, cosine, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, cosine, 14) == pytest.approx(1.0)
    assert lr_multiplier(9, cosine, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(14, cosine, 14) == pytest.approx(0.1)
    assert lr_multiplier(100, cosine, 14) == pytest.approx(0.1)
    linear = OptimConfig(schedule="linear")
    assert lr_multiplier(5, linear, 10) == pytest.approx(0.5)
    assert lr_multiplier(7, OptimConfig(schedule="constant"), 10) == 1.0


def test_schedule_state_is_plain_data_and_resumes():
    optim = OptimConfig(lr=0.1, warmup_steps=2, schedule="linear")

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
        return opt, WarmupDecaySchedule(opt, optim, max_steps=10)

    opt, sched = fresh()
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state == {"steps": 5}
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_deepspeed_config_is_derived_from_the_typed_config():
    config = load_train_config(TINY, ["optim.gradient_accumulation_steps=3", "optim.max_grad_norm=0",
                                      "deepspeed.offload_optimizer=false",
                                      "deepspeed.extra={zero_optimization: {stage3_prefetch_bucket_size: 7}}"])
    ds = build_deepspeed_config(config, world_size=2, on_cpu=True)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.0
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == config.optim.lr
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 7}
    assert ds["bf16"] == {"enabled": False}


@pytest.mark.parametrize("on_cpu, offload, torch_adam", [(True, False, True), (True, True, False),
                                                         (False, False, False), (False, True, False)])
def test_deepspeed_config_offloaded_optimizer_is_deepspeed_cpu_adam_on_every_machine(on_cpu, offload, torch_adam):
    # torch_adam off + offload_optimizer = DeepSpeedCPUAdam, the GPU runs' optimizer; it runs on CPU too.
    config = load_train_config(TINY, [f"deepspeed.offload_optimizer={str(offload).lower()}"])
    ds = build_deepspeed_config(config, world_size=2, on_cpu=on_cpu)
    assert ds["optimizer"]["params"]["torch_adam"] is torch_adam
    assert ("offload_optimizer" in ds["zero_optimization"]) is offload


@pytest.mark.parametrize(
    "extra, match",
    [
        ("{optimizer: {type: SGD}}", "deepspeed.extra.optimizer"),
        ("{train_batch_size: 64}", "deepspeed.extra.train_batch_size"),
        ("{zero_optimization: {stage: 2}}", "deepspeed.extra.zero_optimization.stage"),
        ("{zero_optimization: {zero_hpz_partition_size: 2}}", "zero_hpz_partition_size"),
    ],
)
def test_deepspeed_extra_cannot_override_owned_keys(extra, match):
    with pytest.raises(ConfigError, match=match):  # when the config is loaded, before any rank starts
        load_train_config(TINY, [f"deepspeed.extra={extra}"])
    config = load_train_config(TINY)
    config.deepspeed.extra = yaml.safe_load(extra)  # and for a config edited in code
    with pytest.raises(ConfigError, match=match):
        build_deepspeed_config(config, world_size=1, on_cpu=True)


def test_synthetic_items_are_deterministic_and_padded():
    cfg = SyntheticDataConfig(num_items=6, min_text_len=2, max_text_len=4, edit=True)
    a, b = SyntheticDataset(cfg), SyntheticDataset(cfg)
    assert torch.equal(a[3].latents, b[3].latents) and torch.equal(a[3].embeds, b[3].embeds)
    assert not torch.equal(a[3].latents, a[4].latents)
    batch = a.collate([a[i] for i in range(3)])
    assert batch.latents.shape == (3, 4, 8, 8)
    assert batch.cond.embeds.shape == (3, 4, 32)
    assert batch.cond.mask.sum(dim=1).tolist() == [2, 3, 4]
    assert batch.cond.ref_latents.shape == batch.uncond.ref_latents.shape == (3, 4, 8, 8)
    with pytest.raises(ConfigError, match="synthetic_data.latent_size"):
        SyntheticDataConfig(latent_size=5)


def test_synthetic_loader_resumes_mid_epoch():
    dataset = SyntheticDataset(SyntheticDataConfig(num_items=12))
    first = ResumableLoader(dataset, 2, seed=3, rank=1, world_size=2)
    it = iter(first)
    next(it)
    state = first.state_dict()
    expected = [next(it).indices for _ in range(4)]
    second = ResumableLoader(dataset, 2, seed=3, rank=1, world_size=2)
    second.load_state_dict(state)
    it2 = iter(second)
    assert [next(it2).indices for _ in range(4)] == expected
    assert math.prod(next(it2).latents.shape) > 0
