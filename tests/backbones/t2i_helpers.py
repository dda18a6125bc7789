"""Helpers shared by the SD3.5 and Z-Image backbone tests."""
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file


class TinySetup(NamedTuple):
    conditioner: Any
    pipeline: Any


def tiny_fixture(conditioner_cls, save_tiny_folder, pipeline_cls, **config):
    """A module-scoped fixture giving :func:`tiny_conditioner_and_pipeline` on a fresh tiny folder."""

    @pytest.fixture(scope="module")
    def tiny(tmp_path_factory) -> TinySetup:
        folder = tmp_path_factory.mktemp(conditioner_cls.__name__)
        return tiny_conditioner_and_pipeline(conditioner_cls, save_tiny_folder, pipeline_cls, folder, **config)

    return tiny


def drop_from_checkpoint(folder: Path, key: str) -> None:
    """Remove ``key`` from a saved diffusers model's safetensors file."""
    path = folder / SAFETENSORS_WEIGHTS_NAME
    save_file({k: v for k, v in load_file(path).items() if k != key}, path)


def tiny_conditioner_and_pipeline(conditioner_cls, save_tiny_folder, pipeline_cls, folder: Path, **config):
    """A float32 conditioner loaded through ``from_config`` from a freshly written tiny folder, and the
    diffusers pipeline holding the same models (no transformer), to compare against."""
    save_tiny_folder(folder)
    settings = conditioner_cls.CONFIG(model_path=str(folder), text_encoder_dtype="float32", vae_dtype="float32", **config)
    conditioner = conditioner_cls.from_config(settings)
    pipeline = pipeline_cls(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), **conditioner.components())
    return TinySetup(conditioner, pipeline)


def lora_adapted_modules(model: torch.nn.Module, targets) -> tuple[torch.nn.Module, list[str]]:
    """``get_peft_model`` for ``targets`` (the adapter starts as a no-op) and the names of the modules it
    adapted; fails on a pattern that matches none."""
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=list(targets)))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    for pattern in targets:
        assert any(name.endswith("." + pattern) for name in adapted), pattern
    return peft_model, adapted


def assert_input_checks(backbone, make_cond, channels: int = 16) -> None:
    """The adapter's checks of x_t, the times and the condition's batch (``make_cond(batch)``)."""
    cases = [
        ((2, channels // 4, 4, 4), (2,), 2, "x_t must be"),
        ((2, channels, 5, 4), (2,), 2, "divisible by the patch size"),
        ((2, channels, 4, 4), (3,), 2, "t and tt must have shape"),
        ((2, channels, 4, 4), (2,), 3, "cond batch 3"),
    ]
    for x_shape, t_shape, cond_batch, match in cases:
        with pytest.raises(ValueError, match=match):
            backbone(torch.zeros(x_shape), torch.zeros(t_shape), torch.zeros(t_shape), make_cond(cond_batch))
