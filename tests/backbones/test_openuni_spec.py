"""The OpenUni family behind the seam: its config's checks, the cache schema, the memory plan's terms."""
import pytest
import torch

from twinflow.backbones.openuni.condition import OpenUniPrompt
from twinflow.backbones.openuni.config import LoraSettings, OpenUniBackboneConfig
from twinflow.backbones.openuni.memory import llm_params
from twinflow.backbones.openuni.tiny_encoders import save_tiny_model_folder
from twinflow.backbones.registry import backbone_spec
from twinflow.training.config import load_train_config
from twinflow.utils.typed_config import ConfigError

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("openuni_spec"))


def test_config_refuses_what_cannot_run(folder, tmp_path):
    with pytest.raises(ConfigError, match="'pretrained' must name an OpenUni folder"):
        OpenUniBackboneConfig()
    with pytest.raises(ConfigError, match="'lora.enabled' and 'train_query_head' conflict"):
        OpenUniBackboneConfig(pretrained=str(folder), lora=LoraSettings(enabled=True))
    with pytest.raises(ConfigError, match="edit"):
        OpenUniBackboneConfig(pretrained=str(folder), edit=True)
    spec = backbone_spec("openuni")
    spec.check_model_files(OpenUniBackboneConfig(pretrained=str(folder)))  # the tiny folder is complete
    with pytest.raises(ConfigError, match="has no transformer/config.json"):
        spec.check_model_files(OpenUniBackboneConfig(pretrained=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.llm"):
        spec.check_model_files(OpenUniBackboneConfig(pretrained=str(folder), llm=str(tmp_path)))
    lora = OpenUniBackboneConfig(pretrained=str(folder), train_query_head=False, kernels="triton",
                                 lora=LoraSettings(enabled=True))
    with pytest.raises(ConfigError, match="kernels: triton' and 'model.lora' conflict"):
        spec.check_model_files(lora)


def test_synthetic_data_is_refused_naming_the_key(folder):
    with pytest.raises(ConfigError, match="synthetic_data.text_dim.*prompt token ids"):
        load_train_config(REPO / "configs" / "tiny_cpu.yaml", [f"model={{family: openuni, pretrained: {folder}, dtype: float32}}"])


def test_cache_schema_round_trips_token_rows():
    schema = backbone_spec("openuni").cache_schema
    cond = OpenUniPrompt.cat([OpenUniPrompt(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)),
                              OpenUniPrompt(torch.tensor([[9]]), torch.ones(1, 1, dtype=torch.bool))])
    rows = schema.rows(cond)
    assert [r["input_ids"].tolist() for r in rows] == [[5, 6, 7], [9]]
    back = schema.collate(rows)
    assert torch.equal(back.input_ids, cond.input_ids) and torch.equal(back.mask, cond.mask)
    with pytest.raises(ValueError, match="prompt token ids"):
        schema.collate([{"embeds": torch.zeros(2, 4)}])


def test_memory_plan_counts_the_resident_llm_and_the_trained_head():
    from twinflow.training.memory_plan import plan_from_config

    config = load_train_config(REPO / "configs" / "openuni_full.yaml")
    plan = plan_from_config(config, 8, 80.0)
    terms = {t.key: t for t in plan.terms}
    llm = terms["encoder_language model (InternVL3-2B, frozen)"]
    assert llm.nbytes == 2 * llm_params() == 2 * 1_543_311_872
    inventory = backbone_spec("openuni").memory_inventory(config.model)
    assert any(name.startswith("query_head.connector.") for name in inventory.sizes_by_module)
    assert "query_head" in inventory.sizes_by_module  # the 256 queries (a direct parameter of the head)


def test_memory_plan_adds_the_llm_backward_only_when_the_queries_train():
    from twinflow.training.memory_plan import plan_from_config

    def keys(*overrides):
        config = load_train_config(REPO / "configs" / "openuni_full.yaml", list(overrides))
        return {t.key: t for t in plan_from_config(config, 8, 80.0).terms}

    trained = keys()
    # 28 layers x 16 rows x (512 + 256) tokens x D 1536 x 2 B: the checkpointed layer inputs.
    assert trained["frozen_pass_inputs"].nbytes == 28 * 16 * 768 * 1536 * 2
    assert "frozen_pass_recompute" in trained
    assert not {"frozen_pass_inputs", "frozen_pass_recompute"} & set(keys("model.train_query_head=false"))
    assert "frozen_pass_saved" in keys("model.gradient_checkpointing=false")
