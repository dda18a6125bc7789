"""The reference's OpenUni .pth: safe loading, key mapping onto our modules, conversion to safetensors.

The checkpoint is built here from a tiny model in the reference's key layout (``transformer.*`` for
SANA, ``connector.*`` / ``projector.*`` / ``meta_queries`` for the head, frozen ``lmm.*`` and ``vae.*``).
"""
import argparse

import pytest
import torch
from safetensors.torch import load_file

from twinflow.backbones.openuni.query_head import OpenUniQueryHead
from twinflow.backbones.openuni.reference_checkpoint import (
    ReferenceCheckpointError,
    convert_reference_checkpoint,
    load_reference_checkpoint,
    load_reference_state_dict,
)
from twinflow.backbones.openuni.tiny_encoders import build_tiny_query_head, build_tiny_transformer, tiny_query_head_config
from twinflow.backbones.openuni.transformer import TwinFlowSanaTransformer

from openuni_helpers import plain_sana, twin_sana


def reference_state(seed=0, wrapped=False):
    """(state dict in the reference's layout, the SANA and head it came from)."""
    sana, head = plain_sana(twin_sana(seed)), build_tiny_query_head(seed + 7)
    outer = "transformer." if wrapped else ""
    state = {f"{outer}transformer.{k}": v for k, v in sana.state_dict().items()}
    state.update({f"{outer}{k}": v for k, v in head.state_dict().items() if k != "meta_queries"})
    state["meta_queries"] = head.meta_queries.detach().clone()
    state["lmm.language_model.model.embed_tokens.weight"] = torch.zeros(3, 2)
    state["vae.encoder.conv_in.weight"] = torch.zeros(2)
    return state, sana, head


def assert_same(module, source, skip=""):
    for key, value in source.state_dict().items():
        if not (skip and key.startswith(skip)):
            assert torch.equal(module.state_dict()[key].to(value.dtype), value), key


@pytest.mark.parametrize("wrapped", [False, True], ids=["openuni_layout", "twinflow_layout"])
def test_keys_map_onto_transformer_and_query_head(tmp_path, wrapped):
    state, sana, head = reference_state(wrapped=wrapped)
    path = tmp_path / "openuni.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    transformer, fresh_head = build_tiny_transformer(seed=5), build_tiny_query_head(seed=5)
    before = {k: v.clone() for k, v in transformer.time_embed_2.state_dict().items()}
    ignored = load_reference_checkpoint(path, transformer, fresh_head)
    assert sorted(ignored) == ["lmm.language_model.model.embed_tokens.weight", "vae.encoder.conv_in.weight"]
    assert_same(transformer, sana)
    assert_same(fresh_head, head)
    assert all(torch.equal(transformer.time_embed_2.state_dict()[k], v) for k, v in before.items())


def test_a_pickle_that_needs_more_than_tensors_is_refused(tmp_path):
    state, _, _ = reference_state()
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": state, "meta": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ReferenceCheckpointError, match="unsafe.pth"):
        load_reference_state_dict(path)


def test_keys_that_do_not_fit_are_named(tmp_path):
    state, _, _ = reference_state()
    cases = {
        "stray": ({**state, "ema.weight": torch.zeros(1)}, "ema.weight"),
        "missing": ({k: v for k, v in state.items() if k != "projector.bias"}, "projector.bias"),
        "shape": ({**state, "meta_queries": torch.zeros(3, 3)}, "meta_queries"),
    }
    for name, (bad, key) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ReferenceCheckpointError, match=key.replace(".", r"\.")):
            load_reference_checkpoint(path, build_tiny_transformer(), build_tiny_query_head())


@torch.no_grad()
def test_conversion_writes_safetensors_folders_in_the_checkpoint_dtype(tmp_path):
    state, sana, head = reference_state()
    path = tmp_path / "openuni.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    sana.save_pretrained(tmp_path / "sana")  # only its config.json is read
    out = convert_reference_checkpoint(path, tmp_path / "converted", tmp_path / "sana", tiny_query_head_config())
    stored = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert not any(k.startswith("time_embed_2.") for k in stored)  # plain SANA: the reference never had E2
    transformer = TwinFlowSanaTransformer.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16,
                                                          twin_embedder=True)
    loaded_head = OpenUniQueryHead.from_pretrained(out / "query_head")
    assert loaded_head.projector.weight.dtype == torch.bfloat16
    assert_same(transformer, sana.to(torch.bfloat16))
    assert_same(loaded_head, head.to(torch.bfloat16))
    assert torch.count_nonzero(transformer.time_embed_2.linear.bias) == 0
    assert (out / "ignored_keys.txt").read_text().split() == sorted(k for k in state if k.startswith(("lmm.", "vae.")))


def test_convert_command_writes_a_folder_the_trainer_builds_from(tmp_path):
    """``python -m twinflow.backbones.openuni.convert``: the converted folder (with internvl/ and vae/ linked)
    is ``model.pretrained`` for the builder, and its SANA and head hold the checkpoint's weights."""
    from twinflow.backbones.openuni.build import build_openuni_backbone
    from twinflow.backbones.openuni.config import OpenUniBackboneConfig
    from twinflow.backbones.openuni.convert import main
    from twinflow.backbones.openuni.tiny_encoders import save_tiny_model_folder

    tiny = save_tiny_model_folder(tmp_path / "tiny")
    state, sana, head = reference_state(seed=3)
    torch.save(state, tmp_path / "openuni.pth")
    args = ["--checkpoint", str(tmp_path / "openuni.pth"), "--sana-config", str(tiny / "transformer"),
            "--internvl", str(tiny / "internvl"), "--vae", str(tiny / "vae"),
            "--query-head-config", str(tiny / "query_head"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    backbone = build_openuni_backbone(OpenUniBackboneConfig(pretrained=str(tmp_path / "out"), dtype="float32"), "cpu")
    assert_same(backbone.transformer.sana, sana)
    assert_same(backbone.transformer.query_head, head)
    assert main(args[:-1] + [str(tmp_path / "bad")] + ["--vae", str(tmp_path)]) == 2  # no config.json: named, refused


def test_twinflow_sample_draws_from_a_converted_folder(tmp_path):
    """A converted folder has no export record: its SANA class names the family, its internvl/ and vae/ are the
    encoders, and ``twinflow sample`` draws at 1, 2, 4 and 30 NFE."""
    from twinflow.backbones.openuni.convert import main as convert
    from twinflow.backbones.openuni.tiny_encoders import save_tiny_model_folder
    from twinflow.cli import main as cli

    tiny = save_tiny_model_folder(tmp_path / "tiny")
    torch.save(reference_state(seed=4)[0], tmp_path / "openuni.pth")
    assert convert(["--checkpoint", str(tmp_path / "openuni.pth"), "--sana-config", str(tiny / "transformer"),
                    "--internvl", str(tiny / "internvl"), "--vae", str(tiny / "vae"),
                    "--query-head-config", str(tiny / "query_head"), "--out", str(tmp_path / "out")]) == 0
    presets = ["one_step", "few_step", "any_step", "multi_step"]
    assert cli(["sample", "--model", str(tmp_path / "out"), "--prompt", "a red cat", "--height", "16", "--device", "cpu",
                "--output", str(tmp_path / "png"), *[a for p in presets for a in ("--preset", p)]]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == len(presets)
