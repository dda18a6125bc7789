"""The memory plan: exact parameter counts, each term's formula on hand-computed numbers, the cross-check
against DeepSpeed's own estimator, the measured activation constant, and the shipped config's verdict."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

from twinflow.backbones.qwen_image.memory import ACTIVATIONS, encoder_params, transformer_param_sizes
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer
from twinflow.cli import main
from twinflow.method.config import TwinFlowConfig
from twinflow.training.memory_plan import (
    GiB,
    ActivationShape,
    ParamInventory,
    ZeroSettings,
    largest_teacher_rows,
    max_text_tokens,
    param_sizes_by_module,
    plan_for_model,
)


def _load_measurement():
    """``benchmarks/block_saved_bytes.py`` by path: the measurement is benchmark code, and ``pytest tests``
    alone does not put the repository root on ``sys.path``."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "block_saved_bytes.py"
    spec = importlib.util.spec_from_file_location("block_saved_bytes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure_block_saved_bytes_per_token


measure_block_saved_bytes_per_token = _load_measurement()

BLOCK_SAVED_BYTES_PER_WIDTH = ACTIVATIONS.saved_bytes_per_width
BLOCK_SAVED_BYTES_CONSTANT = ACTIVATIONS.saved_bytes_constant


def qwen_image_inventory(transformer_config=None, twin_embedder=True) -> ParamInventory:
    return ParamInventory(transformer_param_sizes(transformer_config, twin_embedder))

REPO = Path(__file__).resolve().parents[2]
SHIPPED_FULL_CONFIG = REPO / "configs" / "qwen_image_full.yaml"


def test_meta_device_count_equals_a_real_instantiation():
    real = TwinFlowQwenImageTransformer(**tiny_transformer_config())
    meta = qwen_image_inventory(tiny_transformer_config())
    assert dict(meta.sizes_by_module) == param_sizes_by_module(real)
    assert meta.total == sum(p.numel() for p in real.parameters())
    assert meta.num_blocks == 2


def test_qwen_image_20b_parameter_count():
    twin = qwen_image_inventory()
    single = qwen_image_inventory(twin_embedder=False)
    assert abs(twin.total - 20.4e9) / 20.4e9 < 0.01
    d = 3072
    assert twin.total - single.total == (256 * d + d) + (d * d + d)  # time_text_embed_2: Linear(256, D), Linear(D, D)
    assert twin.num_blocks == 60
    assert twin.largest_module == 6 * d * d + 6 * d  # img_mod / txt_mod: Linear(D, 6D)
    encoders = encoder_params()  # model cards: Qwen2.5-VL-7B 8.29B, Qwen-Image VAE 0.13B
    assert abs(encoders["text_encoder"] - 8.29e9) / 8.29e9 < 0.01
    assert abs(encoders["vae"] - 0.13e9) / 0.13e9 < 0.03


def test_each_term_on_round_numbers():
    inv = ParamInventory({
        "transformer_blocks.0.a": (800, 10),
        "transformer_blocks.1.a": (800,),
        "head": (400,),
    })
    zero = ZeroSettings(world_size=4, reduce_bucket_size=1000, prefetch_bucket_size=100, max_live_parameters=5000,
                        param_persistence_threshold=100, sub_group_size=250)
    shape = ActivationShape(main_rows=2, teacher_rows=6, image_tokens=16, text_tokens=4, width=8, num_blocks=2,
                            profile=ACTIVATIONS)
    plan = plan_for_model(inv, zero, shape, gpu_mem_gib=1.0, cuda_context_gib=0.0, fragmentation=0.5)
    part = 200 + 3 + 200 + 100  # ceil(n / 4) per parameter: the 10-element bias pads to 12
    expected = {
        "param_partition": 2 * part,
        "persistent_params": 2 * 10,
        "master_fp32": 4 * part,
        "adam_moments": 8 * part,
        "grad_partition": 2 * part,
        "step_grad_fp32": 4 * 403,  # sub-groups close once they reach 250 elements: [200+3+200], [100]
        "reduce_bucket": 2 * 1000,
        "gathered_params": 2 * (810 + 100),  # the largest block (800 + 10) plus the prefetch bucket
        "module_full_grad": 2 * 810,
        "ema_fp32": 4 * part,
        "ema_shadow": 2 * part,
        "ckpt_inputs": 2 * 2 * 20 * 8 * 2,  # blocks x rows x tokens x D x bf16
        "block_recompute": int(2 * 20 * (BLOCK_SAVED_BYTES_PER_WIDTH * 8 + BLOCK_SAVED_BYTES_CONSTANT)),
        "non_block": 2 * 20 * 4 * 8 * 2,
        "peak_transient": 6 * 20 * 12 * 8 * 2,  # the 6-row teacher pass outweighs 2 rows of backward (6400 B)
    }
    for key, value in expected.items():
        assert plan.term(key).nbytes == value, key
    allocated = sum(expected.values())
    assert plan.term("fragmentation").nbytes == int(0.5 * allocated)
    assert plan.gpu_bytes() == allocated + int(0.5 * allocated)
    assert plan.fits
    assert not plan_for_model(inv, zero, shape, gpu_mem_gib=1e-6, cuda_context_gib=0.0).fits


def test_offloaded_optimizer_moves_its_terms_to_the_host():
    inv = ParamInventory({"m": (4000,)})
    plan = plan_for_model(inv, ZeroSettings(world_size=4, offload_optimizer=True), None, cuda_context_gib=0.0, fragmentation=0.0)
    for key in ("master_fp32", "adam_moments", "grad_partition", "step_grad_fp32", "ema_fp32", "ema_shadow"):
        assert plan.term(key).device == "cpu", key
    assert plan.term("step_grad_fp32").nbytes == 4 * 1000  # one fp32 gradient buffer per sub-group, all of them
    assert plan.term("shadow_on_gpu").nbytes == 2 * 1000
    assert plan.cpu_bytes() == (4 + 8 + 2 + 4 + 4 + 2) * 1000


def test_model_states_agree_with_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_live,
        model_to_params,
    )

    config = dict(tiny_transformer_config(), num_layers=6, attention_head_dim=128, num_attention_heads=4,
                  joint_attention_dim=256)
    model = TwinFlowQwenImageTransformer(**config)
    total, largest = model_to_params(model)
    inv = ParamInventory(param_sizes_by_module(model))
    assert (inv.total, inv.largest_module) == (total, largest)

    def ours(world: int) -> int:
        # DeepSpeed's estimator counts 18 bytes per partitioned parameter (fp32 gradients) and
        # 4 * largest_layer for a gathered layer with its gradient.
        plan = plan_for_model(inv, ZeroSettings(world_size=world, grad_accum_bytes=4), None)
        keys = ("param_partition", "master_fp32", "adam_moments", "grad_partition", "module_full_grad")
        return sum(plan.term(k).nbytes for k in keys) + 2 * inv.largest_module

    for world in (1, 4, 8):
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world, cpu_offload=False,
                                                             cpu_offload_params=False)
        assert abs(ours(world) - ds_gpu) <= 18 * len(inv.param_sizes())  # per-parameter padding to N

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1)
    line = next(ln for ln in printed.getvalue().splitlines() if "offload_param=none, offload_optimizer=none, zero_init=1" in ln)
    per_gpu_gib = float(re.findall(r"([\d.]+)GB", line)[1])
    assert ours(1) / GiB == pytest.approx(per_gpu_gib, abs=0.006)


def test_block_saved_tensors_match_the_measured_constant():
    for heads in (2, 4):
        width = heads * 128
        measured = measure_block_saved_bytes_per_token(heads, image_side=16, text_tokens=64)
        assert measured == pytest.approx(BLOCK_SAVED_BYTES_PER_WIDTH * width + BLOCK_SAVED_BYTES_CONSTANT, rel=0.01)


def test_largest_teacher_pass_follows_the_objective():
    # B = 4, one row per group: guidance runs cond + uncond over the 3 non-adv rows.
    assert largest_teacher_rows(4, TwinFlowConfig()) == 6
    # B = 8: two rows per group; guidance 2 x 6 rows.
    assert largest_teacher_rows(8, TwinFlowConfig()) == 12
    # Without guidance: RCGM over the non-adv rows, rectification over 2 x e2e rows.
    assert largest_teacher_rows(8, TwinFlowConfig(enhanced_ratio=0.0)) == 6
    # Plain flow matching runs no teacher pass.
    assert largest_teacher_rows(4, TwinFlowConfig(preset="flow_matching")) == 0


def test_text_length_defaults_to_the_longest_the_run_can_see(monkeypatch):
    from twinflow.data import cache
    from twinflow.training.config import load_train_config

    assert max_text_tokens(load_train_config(REPO / "configs" / "tiny_cpu.yaml")) == (6, "synthetic_data.max_text_len")
    full = load_train_config(SHIPPED_FULL_CONFIG, [f"data.cache_dir={REPO / 'no_such_cache'}"])
    assert max_text_tokens(full)[0] == 1024  # no cache here: the text encoder's limit
    monkeypatch.setattr(cache, "read_manifest", lambda d: {"fingerprint": {"max_sequence_length": 300}})
    assert max_text_tokens(full)[0] == 300


def _plan_cli(*extra: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["memory-plan", "--config", str(SHIPPED_FULL_CONFIG), "--world-size", "8", *extra])
    return code, out.getvalue()


def test_shipped_full_config_fits_8x80_and_not_a_small_gpu():
    assert SHIPPED_FULL_CONFIG.is_file(), f"the shipped full-training config {SHIPPED_FULL_CONFIG} is missing"
    code, text = _plan_cli("--gpu-mem", "80")
    assert code == 0, text
    assert "FITS" in text and "20,440,630,848" in text
    headroom = float(re.search(r"([\d.]+) GiB headroom", text).group(1))
    assert headroom >= 4.0, text

    code, text = _plan_cli("--gpu-mem", "40")
    assert code == 1
    assert "DOES NOT FIT" in text and "short by" in text
    assert "deepspeed.offload_optimizer=true" in text  # the knobs that would help are planned and listed
