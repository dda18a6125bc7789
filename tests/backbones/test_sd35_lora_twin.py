"""SD3.5 LoRA with the twin embedder (``twin_embedder: true``, which the reference's LoRA recipes never
use): ``lora.train_time_embed_2`` alone decides how ``time_text_embed_2`` (E2) learns.

* ``lora``: LoRA (``default`` + ``ema``) on E2's timestep MLP, trained, covered by the EMA adapter
  teacher, exported in the LoRA folder and merged into E2 of the merged transformer;
* ``frozen``: no adapter and no gradient on E2 (the reference's bare ``timestep_embedder.*`` target
  patterns are anchored to the first embedder by the config);
* ``full``: a per-adapter copy of E2 (works outside ZeRO-3), which the trainer, building under
  ``deepspeed.zero.Init``, cannot do: refused with a ConfigError when the config is checked.

The ZeRO-3 build is one rank in a subprocess (as ``test_qwen_pretrained_zero3.py``), so this process's
torch.distributed state stays untouched; everything else runs in this process on the tiny model.
"""
import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file

from twinflow.backbones.qwen_image.lora import add_lora
from twinflow.backbones.registry import backbone_spec
from twinflow.backbones.sd35 import SD3Condition
from twinflow.backbones.sd35.backbone import SD3Backbone
from twinflow.backbones.sd35.config import SD35BackboneConfig
from twinflow.backbones.sd35.lora import LORA_TARGET_MODULES
from twinflow.backbones.sd35.transformer import TwinFlowSD3Transformer
from twinflow.method.teachers.adapter import AdapterEMATeacher, adapter_pairs, adapter_state
from twinflow.method.teachers.build import build_teacher
from twinflow.utils.typed_config import ConfigError, from_dict

from sd35_helpers import CFG, E2_KEYS, twin_model

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 2, 4.0  # scaling alpha / rank = 2: a power of two, so the merge's scaling rounds nothing
E2 = "time_text_embed_2."
E2_TIME_LINEARS = [f"time_text_embed_2.timestep_embedder.linear_{i}" for i in (1, 2)]
U = 2.0 ** -24  # float32 unit roundoff


def lora_config(mode: str, **lora) -> SD35BackboneConfig:
    return from_dict(SD35BackboneConfig, {
        "transformer": CFG, "dtype": "float32", "twin_embedder": True,
        "lora": {"enabled": True, "rank": RANK, "alpha": ALPHA, "train_time_embed_2": mode, **lora}})


def adapted(mode: str, seed: int = 0):
    """(base, LoRA model, config): the tiny twin model (random weights, large random E2) and a copy with
    the config's adapters injected as the builder does (``place_and_adapt`` -> ``add_lora``)."""
    config = lora_config(mode)
    base = twin_model(seed)
    model = copy.deepcopy(base)
    add_lora(model, config.lora)
    return base, model, config


def batch(n: int = 2, seed: int = 0):
    """x_t, t, tt (tt != t, so E2's term (T - TT) counts), cond."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CFG["in_channels"], 4, 4, generator=g)
    t = 0.2 + 0.8 * torch.rand(n, generator=g)
    cond = SD3Condition(torch.randn(n, 7, CFG["joint_attention_dim"], generator=g),
                        torch.randn(n, CFG["pooled_projection_dim"], generator=g))
    return x, t, 0.3 * t, cond


def sgd_step(model: torch.nn.Module, lr: float = 0.1) -> dict:
    """One SGD step on the mean squared velocity; returns the gradients it applied (by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=lr)
    SD3Backbone(model, dtype=torch.float32)(*batch()).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    optimizer.step()
    return grads


def snapshot(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ config
def test_config_anchors_the_bare_timestep_patterns_to_the_first_embedder():
    spec = backbone_spec(lora_config("lora"))
    for mode in ("lora", "frozen", "full"):
        config = lora_config(mode)
        assert config.lora.target_modules[:2] == [f"time_text_embed.timestep_embedder.linear_{i}" for i in (1, 2)]
        targets = spec.lora_targets(config)
        on_e2 = sorted(t for t in targets for name in E2_TIME_LINEARS if name == t or name.endswith("." + t))
        assert on_e2 == (E2_TIME_LINEARS if mode == "lora" else []), mode
    # the reference's recipes (one embedder) keep their patterns; so does a twin model without LoRA
    single = from_dict(SD35BackboneConfig, {"transformer": CFG, "twin_embedder": False, "lora": {"enabled": True}})
    assert single.lora.target_modules == list(LORA_TARGET_MODULES)
    assert from_dict(SD35BackboneConfig, {"transformer": CFG}).lora.target_modules == list(LORA_TARGET_MODULES)
    # loading the resolved config again gives the same config
    assert lora_config("frozen", target_modules=lora_config("frozen").lora.target_modules) == lora_config("frozen")


@pytest.mark.parametrize("pattern", ["linear_1", "time_text_embed_2.timestep_embedder.linear_2", "text_embedder.linear_1"])
def test_frozen_refuses_a_target_pattern_that_still_reaches_time_text_embed_2(pattern):
    with pytest.raises(ConfigError, match=r"'lora.target_modules' and 'lora.train_time_embed_2: frozen' conflict"):
        lora_config("frozen", target_modules=["attn.to_q", pattern])
    assert pattern in lora_config("lora", target_modules=["attn.to_q", pattern]).lora.target_modules


@pytest.mark.parametrize("mode", [None, "full"])
def test_full_is_refused_when_the_config_is_checked(mode):
    """``full`` (the default with twin_embedder) cannot be built under zero.Init: the trainer's config
    check says so, naming the key, before any rank starts (and before the files are read)."""
    overrides = ["model.twin_embedder=true"] + ([f"model.lora.train_time_embed_2={mode}"] if mode else [])
    from twinflow.training.config import load_train_config

    with pytest.raises(ConfigError, match=r"config key 'model.lora.train_time_embed_2': 'full'.*ZeRO-3.*'lora'"):
        load_train_config(REPO / "configs" / "sd35_lora_1order.yaml", overrides, check_inputs=True)


@pytest.mark.parametrize("mode", ["lora", "frozen"])
def test_lora_and_frozen_pass_the_config_check(mode):
    from twinflow.training.config import load_train_config

    overrides = ["model.twin_embedder=true", f"model.lora.train_time_embed_2={mode}", "model.pretrained=null",
                 f"model.transformer={json.dumps(CFG)}", "kernels=eager"]
    config = load_train_config(REPO / "configs" / "sd35_lora_1order.yaml", overrides).model
    backbone_spec(config).check_model_files(config)  # no error
    assert config.lora.train_time_embed_2 == mode


# ------------------------------------------------------------------------------- outside ZeRO-3
def e2_trainable(model):
    return sorted(n[len(E2):] for n, p in model.named_parameters() if n.startswith(E2) and p.requires_grad)


def test_what_each_setting_injects_into_time_text_embed_2():
    _, lora, _ = adapted("lora")
    for name in E2_TIME_LINEARS:
        layer = lora.get_submodule(name)
        assert isinstance(layer, LoraLayer) and set(layer.lora_A) == set(layer.lora_B) == {"default", "ema"}, name
    assert not any(isinstance(m, BaseTunerLayer) for m in lora.time_text_embed_2.text_embedder.modules())
    assert e2_trainable(lora) == sorted(f"timestep_embedder.linear_{i}.lora_{ab}.default.weight"
                                        for i in (1, 2) for ab in "AB")

    _, frozen, _ = adapted("frozen")
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in frozen.time_text_embed_2.modules())
    assert e2_trainable(frozen) == []
    assert isinstance(frozen.time_text_embed.timestep_embedder.linear_1, LoraLayer)  # E1 keeps its LoRA

    _, full, _ = adapted("full")  # outside ZeRO-3: E2 trained whole, one copy per adapter, no LoRA inside
    assert isinstance(full.time_text_embed_2, ModulesToSaveWrapper)
    assert set(full.time_text_embed_2.modules_to_save) == {"default", "ema"}
    assert not any(isinstance(m, BaseTunerLayer) for m in full.time_text_embed_2.modules())
    assert e2_trainable(full) == sorted(f"modules_to_save.default.{k[len(E2):]}" for k in E2_KEYS)


def test_lora_on_time_text_embed_2_starts_as_a_no_op_and_one_step_trains_only_its_default_adapter():
    base, model, _ = adapted("lora", seed=1)
    with torch.no_grad():  # B = 0: every adapter adds exact zeros
        assert torch.equal(SD3Backbone(model, dtype=torch.float32)(*batch()),
                           SD3Backbone(base, dtype=torch.float32)(*batch()))
    before = snapshot(model)
    grads = sgd_step(model)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # B = 0 makes dL/dA = 0 on the first step; dL/dB != 0 on E2's two linears
    for name in E2_TIME_LINEARS:
        assert grads[f"{name}.lora_B.default.weight"].abs().max() > 0, name
        assert not grads[f"{name}.lora_A.default.weight"].any(), name
        assert f"{name}.lora_B.default.weight" in changed, name
    # only default-adapter weights moved: the base weights (E2's included) and the EMA adapter did not
    assert changed and all(".default." in n for n in changed), sorted(changed)
    with torch.no_grad():  # and E2's adapter now changes the output
        assert not torch.equal(SD3Backbone(model, dtype=torch.float32)(*batch()),
                               SD3Backbone(base, dtype=torch.float32)(*batch()))


def test_frozen_time_text_embed_2_gets_no_gradient():
    _, model, _ = adapted("frozen", seed=2)
    before = snapshot(model)
    grads = sgd_step(model)
    assert not any(n.startswith(E2) for n in grads)
    assert all(p.grad is None for p in model.time_text_embed_2.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith(E2))
    assert grads["time_text_embed.timestep_embedder.linear_2.lora_B.default.weight"].abs().max() > 0  # E1 learns


def test_ema_adapter_teacher_covers_the_time_text_embed_2_adapter():
    _, model, _ = adapted("lora", seed=3)
    teacher = build_teacher(model, 0.6, backend="eager", lora=True)
    assert isinstance(teacher, AdapterEMATeacher)
    names = {id(p): n for n, p in model.named_parameters()}
    pairs = {(names[id(ema)], names[id(src)]) for ema, src in adapter_pairs(model)}
    e2_pairs = {(e, s) for e, s in pairs if s.startswith(E2)}
    assert e2_pairs == {(f"{n}.lora_{ab}.ema.weight", f"{n}.lora_{ab}.default.weight")
                        for n in E2_TIME_LINEARS for ab in "AB"}
    e2 = {s: model.get_parameter(s) for _, s in e2_pairs}
    ema = {s: model.get_parameter(e) for e, s in e2_pairs}
    sgd_step(model)
    teacher.update()  # decay 0: a copy of the stepped adapter
    assert all(torch.equal(ema[s], e2[s]) for s in e2)
    first = {s: ema[s].detach().clone() for s in e2}
    sgd_step(model)
    teacher.update()  # decay 0 + (1 - 0) * (0.6 - 0) / 2 = 0.3
    for s in e2:
        # the kernel's float32 src + float32(1 - w) * (ema - src), w = float32(0.7): the coefficient (0.7 ulp
        # of |ema - src|), the difference, the product and the sum each round once: < 3 ulp of |ema| + |src|
        expected = 0.3 * first[s].double() + 0.7 * e2[s].detach().double()
        tol = 3 * U * (first[s].double().abs() + e2[s].detach().double().abs())
        assert ((ema[s].double() - expected).abs() <= tol).all(), s
    assert any(not torch.equal(first[s], ema[s]) for s in e2)
    with teacher.session():
        assert all(model.get_submodule(n).active_adapters == ["ema"] for n in E2_TIME_LINEARS)
    assert all(model.get_submodule(n).active_adapters == ["default"] for n in E2_TIME_LINEARS)


# ------------------------------------------------------------------------------------------ export
def test_export_writes_the_adapter_and_a_merged_transformer_equal_to_the_adapted_model(tmp_path):
    _, model, config = adapted("lora", seed=4)
    with torch.no_grad():  # trained-looking adapters: B != 0 everywhere, so every merge matters
        for i, (n, p) in enumerate(model.named_parameters()):
            if ".default." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    model.eval()
    # a copy: the export assigns the state's tensors to its model and merges into them in place (the
    # trainer passes gathered copies)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    backbone_spec(config).write_export(state, dict(model.config), config, tmp_path, weights="online", merge_lora=True)

    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for name in E2_TIME_LINEARS:
        for ab in "AB":
            assert torch.equal(lora[f"transformer.{name}.lora_{ab}.weight"],
                               model.get_parameter(f"{name}.lora_{ab}.default.weight")), (name, ab)

    merged = TwinFlowSD3Transformer.from_pretrained(str(tmp_path / "transformer")).eval()
    assert merged.config.twin_embedder and set(E2_KEYS) <= set(merged.state_dict())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(E2_TIME_LINEARS) <= set(layers)
    # 1. weights: the float32 merge W + s (B @ A) rounds the rank-r products and their sum (gamma_r,
    #    about r ulp of sum |B||A|), the scaling s = 2 exactly, the addition once (1 ulp of the result).
    bounds = {}
    for name, layer in layers.items():
        w, a, b = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                                 layer.lora_B["default"].weight))
        s = layer.scaling["default"]
        got = merged.get_parameter(f"{name}.weight").double()
        bounds[name] = U * got.abs() + (RANK + 1) * U * s * (b.abs() @ a.abs())
        assert ((got - (w + s * b @ a)).abs() <= bounds[name]).all(), name
    plain = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    for key, value in merged.state_dict().items():  # everything else is the base model, bit for bit
        if key.removesuffix(".weight") not in layers and key != "pos_embed.pos_embed":
            source = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(value, plain.get(key, plain.get(source))), key

    # 2. outputs, in float64 so that the forward passes add no rounding of their own: the merged model
    #    differs from the adapted one only by the merge's weight errors dW (|dW| <= the bounds above),
    #    so each output element differs by at most sum_j |dy/dW_j| * bound_j to first order, taken from
    #    the merged model's gradients; 1% covers the second order (~(1e-7)^2 relative) and 1e-12 max|y|
    #    the float64 forwards' own rounding (2^-53 times dot lengths <= 256 over a few layers).
    x, t, tt, cond = batch(1, seed=5)
    cond64 = SD3Condition(cond.embeds.double(), cond.pooled.double())
    adapted64 = SD3Backbone(copy.deepcopy(model).double(), dtype=torch.float64)
    merged64 = SD3Backbone(merged.double(), dtype=torch.float64)
    with torch.no_grad():
        y_adapted = adapted64(x.double(), t, tt, cond64).flatten()
        with adapter_state(adapted64.transformer.time_text_embed_2, None):  # E2's adapter off, the rest on
            y_without_e2 = adapted64(x.double(), t, tt, cond64).flatten()
    weights = [merged.get_parameter(f"{n}.weight") for n in layers]
    y_merged = merged64(x.double(), t, tt, cond64).flatten()
    first_order = torch.stack([
        sum((g.abs() * bounds[n]).sum() for n, g in zip(layers, torch.autograd.grad(y_merged[i], weights,
                                                                                   retain_graph=True)))
        for i in range(y_merged.numel())])
    diff = (y_merged.detach() - y_adapted).abs()
    assert (diff <= 1.01 * first_order + 1e-12 * y_adapted.abs().max()).all(), (diff / first_order).max()
    # the bound is far below what leaving E2's adapter out of the merge would change
    assert first_order.max() < 1e-4 * (y_adapted - y_without_e2).abs().max()


# ------------------------------------------------------------------------------------------ ZeRO-3
ZERO3_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, deepspeed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    from twinflow.training.distributed import release_cpu_shm_name

    release_cpu_shm_name()  # DeepSpeed leaves its /dev/shm workspace otherwise
    from peft.tuners.tuners_utils import BaseTunerLayer
    from twinflow.backbones.sd35 import SD3Condition
    from twinflow.backbones.sd35.build import build_sd35_backbone
    from twinflow.backbones.sd35.config import SD35BackboneConfig
    from twinflow.backbones.sd35.tiny import tiny_transformer_config
    from twinflow.method.teachers.adapter import adapter_state
    from twinflow.utils.typed_config import from_dict

    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}}
    cfg = tiny_transformer_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg["in_channels"], 4, 4, generator=g)
    cond = SD3Condition(torch.randn(1, 7, cfg["joint_attention_dim"], generator=g),
                        torch.randn(1, cfg["pooled_projection_dim"], generator=g))
    t, tt = torch.tensor([0.8]), torch.tensor([0.2])

    def gathered_state(module):
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: p.detach().clone() for n, p in module.named_parameters()}

    out = {}
    for mode in ("full", "lora", "frozen"):
        config = from_dict(SD35BackboneConfig, {"transformer": cfg, "dtype": "float32", "twin_embedder": True,
                                                "lora": {"enabled": True, "rank": 2, "train_time_embed_2": mode}})
        try:
            with deepspeed.zero.Init(config_dict_or_path=ds):
                backbone = build_sd35_backbone(config, "cpu")
        except Exception as e:
            out[mode] = {"error": f"{type(e).__name__}: {e}"}
            continue
        e2 = backbone.transformer.time_text_embed_2
        result = {"partitioned": all(hasattr(p, "ds_id") for p in backbone.parameters()),
                  "e2_tuners": sum(isinstance(m, BaseTunerLayer) for m in e2.modules()),
                  "e2_trainable": sorted(n for n, p in e2.named_parameters() if p.requires_grad)}
        before = gathered_state(backbone.transformer)
        result["e2_lora_B_zero"] = all(not v.any() for n, v in before.items() if n.startswith("time_text_embed_2.")
                                       and "lora_B" in n)
        result["e2_lora_A_set"] = all(v.any() for n, v in before.items() if n.startswith("time_text_embed_2.")
                                      and "lora_A" in n)
        engine, *_ = deepspeed.initialize(model=backbone, config=ds,
                                          model_parameters=[p for p in backbone.parameters() if p.requires_grad])
        with torch.no_grad():
            fresh = engine(x, t, tt, cond)
            with adapter_state(backbone.transformer, None):
                plain = engine(x, t, tt, cond)
        result["fresh_is_base"] = bool(torch.equal(fresh, plain))
        engine.backward(engine(x, t, tt, cond).square().mean())
        engine.step()
        after = gathered_state(backbone.transformer)
        result["changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        out[mode] = result
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.distributed
def test_zero3_build_of_each_setting(tmp_path):
    """What the trainer builds under zero.Init (one rank): ``full`` is the builder's error (which the
    config check above now reports earlier), ``lora`` trains E2's adapter, ``frozen`` leaves E2 alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(ZERO3_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])

    error = out["full"]["error"]
    assert error.startswith("ValueError: config key 'lora.train_time_embed_2': 'full'") and "ZeRO-3" in error
    lora, frozen = out["lora"], out["frozen"]
    assert lora["partitioned"] and frozen["partitioned"]
    assert lora["fresh_is_base"] and frozen["fresh_is_base"]
    assert lora["e2_tuners"] == 2 and lora["e2_lora_B_zero"] and lora["e2_lora_A_set"]
    assert lora["e2_trainable"] == sorted(f"timestep_embedder.linear_{i}.lora_{ab}.default.weight"
                                          for i in (1, 2) for ab in "AB")
    e2_changed = [n for n in lora["changed"] if n.startswith(E2)]
    # Adam moves what has a gradient: dL/dA = 0 while B = 0, so only E2's two B matrices
    assert e2_changed == [f"{n}.lora_B.default.weight" for n in E2_TIME_LINEARS]
    assert all(".default." in n for n in lora["changed"])  # base weights and the EMA adapter untouched
    assert frozen["e2_tuners"] == 0 and frozen["e2_trainable"] == []
    assert frozen["changed"] and not any(n.startswith(E2) for n in frozen["changed"])
