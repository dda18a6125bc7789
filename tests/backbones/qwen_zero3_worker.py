"""Two CPU ranks over gloo: the Qwen-Image backbone built under ``deepspeed.zero.Init`` (ZeRO-3).

Run by ``test_qwen_zero3.py`` as ``python qwen_zero3_worker.py`` (it spawns its own ranks). Each check compares the
partitioned model with an ordinary model holding the same (gathered) weights. Exits non-zero on failure.
"""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(data: dict, partitioned: bool):
    import deepspeed

    from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
    from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
    from twinflow.utils.typed_config import from_dict

    config = from_dict(QwenImageBackboneConfig, data)
    if not partitioned:
        return build_qwen_image_backbone(config, "cpu")
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        return build_qwen_image_backbone(config, "cpu")


def inputs():
    from qwen_helpers import C, make_cond

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, 4, 4, generator=g)
    t = torch.rand(2, generator=g)
    return x, t, t * 0.5, make_cond([2, 5])


def check_full_finetune_with_triton_embedding() -> None:
    """Full fine-tuning (no LoRA) with the fused time embedding: forward equals the unpartitioned model."""
    import deepspeed

    from qwen_helpers import randomize_
    from twinflow.backbones.qwen_image.tiny import tiny_transformer_config

    data = {"transformer": tiny_transformer_config(), "dtype": "float32", "kernels": "triton"}
    model = build(data, partitioned=True)
    assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if p.ds_numel > 1)
    state = full_state(model)
    for key in [k for k in state if k.startswith("transformer.time_text_embed_2.")]:
        assert torch.equal(state[key], state[key.replace("_2.", ".", 1)]), f"{key} is not a copy of E1"
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            randomize_(model, 11)
    reference = build(data, partitioned=False)
    reference.load_state_dict(full_state(model))
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, model_parameters=model.parameters())
    x, t, tt, cond = inputs()
    out = engine(x, t, tt, cond)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, t, tt, cond), rtol=1e-5, atol=1e-5)
    engine.backward(out.square().mean())
    engine.step()


def check_lora_with_ema_adapter() -> None:
    """LoRA built under zero.Init: zero-initialised B, working forward/step, EMA update on shards."""
    import deepspeed

    from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
    from twinflow.method.teachers.adapter import adapter_pairs
    from twinflow.method.teachers.build import build_teacher

    lora = {"enabled": True, "rank": 4, "train_time_embed_2": "lora"}
    data = {"transformer": tiny_transformer_config(), "dtype": "float32", "lora": lora}
    model = build(data, partitioned=True)
    state = full_state(model)
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b), "LoRA B must start at zero under zero.Init"
    assert any(v.any() for k, v in state.items() if "lora_A" in k)
    for key in [k for k in state if ".lora_A.ema." in k]:
        assert torch.equal(state[key], state[key.replace(".ema.", ".default.")]), key
    reference = build(data, partitioned=False)
    reference.load_state_dict(state)
    engine, *_ = deepspeed.initialize(
        model=model, config=DS_CONFIG, model_parameters=[p for p in model.parameters() if p.requires_grad]
    )
    teacher = build_teacher(engine.module, 0.5, backend="eager", lora=True)
    x, t, tt, cond = inputs()
    out = engine(x, t, tt, cond)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, t, tt, cond), rtol=1e-5, atol=1e-5)
    engine.backward(out.square().mean())
    engine.step()
    teacher.update()  # d = 0: the EMA adapter becomes the stepped trainable adapter
    pairs = adapter_pairs(engine.module)
    with deepspeed.zero.GatheredParameters([p for pair in pairs for p in pair]):
        assert any(src.any() for _, src in pairs if src.ndim == 2)
        for ema, src in pairs:
            assert torch.equal(ema, src)
    with teacher.session() as teacher_model:
        teacher_out = teacher_model(x, t, tt, cond)
    assert teacher_out.isfinite().all()


def checks() -> None:
    check_full_finetune_with_triton_embedding()
    check_lora_with_ema_adapter()


if __name__ == "__main__":
    from zero3_ranks import run_ranks

    run_ranks(checks)
