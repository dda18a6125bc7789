"""QwenImageBackboneConfig validation and build_qwen_image_backbone from a local folder."""
import pytest
import torch

from twinflow.backbones.qwen_image.build import build_qwen_image_backbone
from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
from twinflow.backbones.qwen_image.tiny import tiny_transformer_config
from twinflow.utils.typed_config import ConfigError, from_dict

from qwen_helpers import C, make_cond, plain_copy, twin_model


@pytest.mark.parametrize(
    "data, match",
    [
        ({}, "exactly one of config keys 'pretrained' and 'transformer'"),
        ({"pretrained": "x", "transformer": {}}, "exactly one of"),
        ({"transformer": {}, "attention": "auto"}, "unknown config key"),
        ({"transformer": {}, "dtype": "fp8"}, "'dtype'"),
        ({"transformer": {}, "lora": {"rank": 0}}, "'lora.rank' must be >= 1"),
        ({"transformer": {}, "lora": {"dropout": 1.0}}, "'lora.dropout'"),
        ({"transformer": {}, "lora": {"target_modules": []}}, "'lora.target_modules'"),
        ({"transformer": {}, "twin_embedder": False, "lora": {"train_time_embed_2": "full"}}, "needs twin_embedder"),
        ({"transformer": {}, "kernels": "triton", "lora": {"enabled": True, "train_time_embed_2": "lora"}}, "conflict"),
    ],
)
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(QwenImageBackboneConfig, data)


def test_train_time_embed_2_default_follows_twin_embedder():
    assert from_dict(QwenImageBackboneConfig, {"transformer": {}}).lora.train_time_embed_2 == "full"
    single = from_dict(QwenImageBackboneConfig, {"transformer": {}, "twin_embedder": False})
    assert single.lora.train_time_embed_2 == "frozen"


def test_build_errors():
    missing = from_dict(QwenImageBackboneConfig, {"pretrained": "/nonexistent/qwen"})
    with pytest.raises(ConfigError, match="'pretrained': /nonexistent/qwen holds no transformer config.json"):
        build_qwen_image_backbone(missing, "cpu")
    # A top-level key or a misspelled key inside the inline transformer config fails when the config is
    # loaded, before anything is built (and without importing diffusers).
    with pytest.raises(ConfigError, match="'transformer.kernels' is a top-level backbone key"):
        from_dict(QwenImageBackboneConfig, {"transformer": {**tiny_transformer_config(), "kernels": "eager"}})
    with pytest.raises(ConfigError, match="unknown config key 'transformer.num_layer' \\(did you mean 'num_layers'\\?\\)"):
        from_dict(QwenImageBackboneConfig, {"transformer": {**tiny_transformer_config(), "num_layer": 2}})


def test_transformer_keys_match_the_transformer_signature():
    """The config's list of inline transformer keys (and defaults) is the transformer's signature."""
    import inspect

    from twinflow.backbones.qwen_image.config import TRANSFORMER_DEFAULTS
    from twinflow.backbones.qwen_image.transformer import TwinFlowQwenImageTransformer

    params = inspect.signature(TwinFlowQwenImageTransformer.__init__).parameters
    signature = {k: p.default for k, p in params.items() if k not in ("self", "twin_embedder", "kernels")}
    assert TRANSFORMER_DEFAULTS == signature


@torch.no_grad()
def test_build_from_a_plain_qwen_image_pipeline_folder(tmp_path):
    plain = plain_copy(twin_model(seed=4))
    plain.save_pretrained(tmp_path / "transformer")
    config = from_dict(QwenImageBackboneConfig, {"pretrained": str(tmp_path), "dtype": "float32"})
    backbone = build_qwen_image_backbone(config, "cpu")
    transformer = backbone.transformer
    assert torch.equal(transformer.time_text_embed_2.timestep_embedder.linear_1.weight,
                       plain.time_text_embed.timestep_embedder.linear_1.weight)
    x, t, cond = torch.randn(2, C, 4, 4), torch.rand(2), make_cond([3, 3])
    from twinflow.backbones.qwen_image.backbone import pack_latents, unpack_latents

    expected = plain(hidden_states=pack_latents(x), encoder_hidden_states=cond.embeds, timestep=t,
                     img_shapes=[[(1, 2, 2)]] * 2, return_dict=False)[0]
    assert torch.equal(backbone(x, t, t, cond), unpack_latents(expected, 4, 4))


def test_lora_full_copy_of_the_second_embedder_is_refused_before_the_run(tmp_path):
    """The trainer builds under ``deepspeed.zero.Init``, where LoRA cannot copy ``time_text_embed_2`` per
    adapter: ``train_time_embed_2: full`` (the default with a twin embedder) is refused when the inputs are
    checked, naming the key, before any rank starts; ``lora`` and ``frozen`` pass that check."""
    from pathlib import Path

    from twinflow.training.config import load_train_config
    from twinflow.utils.typed_config import ConfigError

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu_lora.yaml"
    with pytest.raises(ConfigError, match=r"'model.lora.train_time_embed_2': 'full' copies time_text_embed_2"):
        load_train_config(tiny, ["model.twin_embedder=true"], check_inputs=True)
    for mode in ("lora", "frozen"):
        load_train_config(tiny, ["model.twin_embedder=true", f"model.lora.train_time_embed_2={mode}"], check_inputs=True)
