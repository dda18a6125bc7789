"""Z-Image behind the seam: its config, the published TwinFlow-Z-Image-Turbo layout through
``twinflow sample --model <folder>`` (no export record, no remapping) at 1, 2, 4 and 30 NFE, and the
fused kernel accepted (``kernels: triton``) for Z-Image and SD3.5."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from twinflow.backbones.registry import backbone_spec, family_of_model_folder
from twinflow.backbones.z_image.config import TRANSFORMER_DEFAULTS
from twinflow.backbones.z_image.tiny_encoders import save_tiny_model_folder
from twinflow.backbones.z_image.transformer import TwinFlowZImageTransformer
from twinflow.cli import main as twinflow
from twinflow.training.config import load_train_config
from twinflow.utils.typed_config import ConfigError

from z_image_helpers import plain_copy, twin_model

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu_z_image.yaml"


def test_transformer_defaults_are_the_constructor_signature():
    params = list(inspect.signature(TwinFlowZImageTransformer.__init__).parameters.values())[1:]
    got = {p.name: tuple(p.default) if isinstance(p.default, list) else p.default for p in params
           if p.name != "kernels"}  # a runtime choice, not a config.json key (ignore_for_config)
    assert got == TRANSFORMER_DEFAULTS


def test_configs_load_and_the_tiny_one_is_the_tiny_model():
    from twinflow.backbones.z_image.tiny import tiny_transformer_config

    for name in ("z_image_full", "z_image_lora", "tiny_cpu_z_image"):
        assert load_train_config(REPO / "configs" / f"{name}.yaml").model.family == "z_image"
    tiny = load_train_config(TINY).model.transformer
    assert json.loads(json.dumps(tiny)) == json.loads(json.dumps(tiny_transformer_config()))


def test_fused_kernel_is_accepted_for_z_image_and_sd35():
    for config in (TINY, REPO / "configs" / "sd35_full.yaml"):
        cfg = load_train_config(config, ["kernels=triton"])  # the top-level key sets model.kernels
        assert cfg.model.kernels == "triton"
        if config == TINY:
            backbone_spec(cfg.model).check_model_files(cfg.model)


@pytest.mark.parametrize("name", ["sd35_lora_1order", "z_image_lora"])
def test_fused_kernel_with_lora_on_the_time_embedders_is_refused(name):
    """The kernel reads the embedders' Linear weights: LoRA on them (SD3.5's default targets, Z-Image's
    default ``train_time_embed_2: lora``) conflicts with kernels: triton, and is named before building."""
    cfg = load_train_config(REPO / "configs" / f"{name}.yaml", ["kernels=triton"])
    with pytest.raises(ConfigError, match="conflict"):
        backbone_spec(cfg.model).check_model_files(cfg.model)
    eager = load_train_config(REPO / "configs" / f"{name}.yaml", ["kernels=eager"]).model
    assert eager.kernels == "eager" and eager.lora.enabled


def published_folder(root: Path) -> Path:
    """A pipeline root as published: transformer/ with diffusers' config and t_embedder_2.* beside the
    base keys, and the (tiny) encoders."""
    model = twin_model(seed=3)
    plain_copy(model).save_pretrained(root / "transformer")
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("t_embedder_2.")})
    save_file(state, path)
    save_tiny_model_folder(root)
    return root


def test_published_layout_samples_through_the_cli_at_1_2_4_and_30_nfe(tmp_path, capsys):
    root = published_folder(tmp_path / "TwinFlow-Z-Image-Turbo")
    assert family_of_model_folder(root) == "z_image"
    backbone = backbone_spec("z_image").load_for_sampling(str(root), "float32", "cpu")
    want = twin_model(seed=3).state_dict()
    got = backbone.transformer.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    presets = ["one_step", "few_step", "any_step", "multi_step"]  # 1, 2, 4 and 30 NFE
    args = ["sample", "--model", str(root), "--prompt", "a red cat", "--height", "32", "--device", "cpu",
            "--output", str(tmp_path / "out")]
    assert twinflow(args + [a for p in presets for a in ("--preset", p)]) == 0
    written = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert len(written) == len(presets) and all(Path(p).is_file() for p in written)
