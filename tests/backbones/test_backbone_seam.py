"""The backbone seam (twinflow/backbones/registry.py): code outside twinflow/backbones/ reaches a backbone
only through the registry, and the trainer-facing functions dispatch on ``model.family``.

The second test family here (``toy_mlp``, the small dual-time MLP of ``twinflow/backbones/mlp.py`` with a
pooled-vector condition) is registered by the test alone: nothing in twinflow/training, twinflow/data or
twinflow/method knows about it.
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import torch

from twinflow.backbones.mlp import DualTimeMLP
from twinflow.backbones.registry import (
    DEFAULT_FAMILY,
    ActivationProfile,
    BackboneSpec,
    CacheSchema,
    DataShapes,
    MemoryInventory,
    backbone_spec,
    families,
    param_sizes_by_module,
    register_backbone,
    unregister_backbone,
)
from twinflow.kernels.dual_time_rule import QWEN_IMAGE, SD35
from twinflow.utils.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SEAM_SIDE = ["twinflow/training", "twinflow/method", "twinflow/data", "twinflow/sampling", "twinflow/cli.py"]
"""Code that must reach backbones through the registry only."""
PENDING: dict[str, str] = {}
"""Known exceptions, each with the change that removes it."""


# ------------------------------------------------------------------------------------ the rule
def _modules(root: Path) -> list[Path]:
    files = []
    for entry in SEAM_SIDE:
        path = root / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _imported(node: ast.AST, module: Path, root: Path) -> list[str]:
    """Absolute names of the modules an import statement imports (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = list(module.relative_to(root).with_suffix("").parts[:-1])
        base = ".".join(package[: len(package) - node.level + 1])
        prefix = f"{base}.{node.module}" if node.module else base
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def seam_violations(family_names: Sequence[str], root: Path = REPO) -> list[str]:
    """Every import of a backbone module other than the registry, and every string constant (docstrings
    aside) naming a family, in the modules of :data:`SEAM_SIDE` (less :data:`PENDING`)."""
    found = []
    for path in _modules(root):
        rel = str(path.relative_to(root))
        if rel in PENDING:
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)  # prose may point to an example family
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            for name in _imported(node, path, root):
                if name.startswith("twinflow.backbones.") and not name.startswith("twinflow.backbones.registry"):
                    found.append(f"{rel}:{node.lineno} imports {name}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                named = [f for f in family_names if node.value == f or f"backbones.{f}" in node.value]
                if named:
                    found.append(f"{rel}:{node.lineno} names the family {named[0]!r}")
    return found


def test_training_data_method_sampling_and_cli_reach_backbones_only_through_the_registry():
    assert DEFAULT_FAMILY in families()
    assert seam_violations(families()) == []


def test_the_rule_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "twinflow" / "data" / "_seam_probe.py"
    bad.parent.mkdir(parents=True)
    bad.write_text('"""Docstrings may say twinflow.backbones.qwen_image."""\n'
                   "from ..backbones.qwen_image import condition\nimport twinflow.backbones.qwen_image.build\n"
                   "from twinflow.backbones.registry import backbone_spec\nFAMILY = 'qwen_image'\n")
    found = seam_violations(families(), root=tmp_path)
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports twinflow.backbones.qwen_image", "imports twinflow.backbones.qwen_image.condition",
        "imports twinflow.backbones.qwen_image.build", "names the family 'qwen_image'"]


# ---------------------------------------------------------------------------- a second family
@dataclass
class ToyLora:
    enabled: bool = False


@dataclass
class ToyConfig:
    family: str = "toy_mlp"
    width: int = 16
    depth: int = 2
    data_dim: int = 256
    dtype: str = "float32"
    edit: bool = False
    kernels: str = "eager"
    gradient_checkpointing: bool = False
    lora: ToyLora = field(default_factory=ToyLora)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class PooledCondition:
    """A pooled text vector per row (SD3-style), indexable and concatenable."""

    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def index(self, idx: Any) -> "PooledCondition":
        return PooledCondition(self.pooled[idx])

    @classmethod
    def cat(cls, conds: Sequence["PooledCondition"]) -> "PooledCondition":
        return cls(torch.cat([c.pooled for c in conds]))

    def to(self, *args: Any, **kwargs: Any) -> "PooledCondition":
        return PooledCondition(self.pooled.to(*args, **kwargs))


class PooledSchema(CacheSchema):
    format = "toy-pooled-cache"

    def rows(self, cond: PooledCondition) -> list[dict[str, Any]]:
        return [{"pooled": cond.pooled[r]} for r in range(len(cond))]

    def collate(self, rows: Sequence[Mapping[str, Any]]) -> PooledCondition:
        # Synthetic data gives text embeddings (L, D): their mean is the pooled vector.
        return PooledCondition(torch.stack([r["pooled"] if "pooled" in r else r["embeds"].mean(0) for r in rows]))

    def layout(self, cond: PooledCondition) -> dict[str, Any]:
        return {"pooled_dim": int(cond.pooled.shape[-1])}

    def has_reference(self, layout: Mapping[str, Any]) -> bool:
        return False


class ToyBackbone(torch.nn.Module):
    """``F(x_t, t, tt, cond)`` on (B, C, h, w) latents through the flat dual-time MLP."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.transformer = DualTimeMLP(data_dim=config.data_dim, width=config.width, depth=config.depth)

    def forward(self, x_t, t, tt, cond):
        return self.transformer(x_t.flatten(1), t, tt).view_as(x_t)


class ToySpec(BackboneSpec):
    config_type = ToyConfig
    condition_type = PooledCondition
    cache_schema = PooledSchema()

    def builder(self):
        return lambda config, device: ToyBackbone(config).to(device)

    def dual_time_rule(self, config):
        return SD35

    def check_model_files(self, config):
        pass

    def check_data_shapes(self, config, shapes: DataShapes, *, read_files):
        if shapes.latent_channels * shapes.height * shapes.width != config.data_dim:
            raise ConfigError(f"config key '{shapes.channels_key}': latents do not flatten to model.data_dim")

    def memory_inventory(self, config):
        with torch.device("meta"):
            model = DualTimeMLP(data_dim=config.data_dim, width=config.width, depth=config.depth)
        profile = ActivationProfile(8.0, 0, 2, 2, 1, "the toy MLP block")
        return MemoryInventory(param_sizes_by_module(model), "blocks.", config.width, 1, "toy config", profile)

    def latent_factor(self):
        return 1

    def max_text_tokens(self, fingerprint):
        return 1


@pytest.fixture
def toy_family():
    register_backbone("toy_mlp")(ToySpec)
    yield backbone_spec("toy_mlp")
    unregister_backbone("toy_mlp")


def _toy_config(*overrides: str):
    from twinflow.training.config import load_train_config

    return load_train_config(TINY, ["model={family: toy_mlp}", "synthetic_data.latent_size=8",
                                    "synthetic_data.latent_channels=4", *overrides])


def test_model_family_selects_the_section_and_the_default_is_unchanged(toy_family):
    from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig
    from twinflow.training.config import load_train_config

    assert type(load_train_config(TINY).model) is QwenImageBackboneConfig  # no family key: as before
    config = _toy_config()
    assert type(config.model) is ToyConfig and config.model.kernels == "eager"
    with pytest.raises(ConfigError, match="model.data_dim"):
        _toy_config("synthetic_data.latent_size=4")  # the family's own shape check, from the trainer's config
    with pytest.raises(ConfigError, match=r"config key 'model.family': unknown backbone family 'nope'"):
        load_train_config(TINY, ["model.family=nope"])


def test_trainer_facing_functions_dispatch_on_the_family(toy_family, tmp_path):
    from twinflow.data.cache import CachedDataset, CacheWriter
    from twinflow.data.stats import DataStats
    from twinflow.training.data import build_loader
    from twinflow.training.memory_plan import plan_from_config

    config = _toy_config()
    # Build (what Trainer.build_partitioned_backbone calls inside zero.Init) and F(x_t, t, tt, cond).
    model = backbone_spec(config.model).builder()(config.model, "cpu")
    loader = build_loader(None, config.synthetic_data, 4, 0, 1, family=config.model.family)
    batch = next(iter(loader))
    assert isinstance(batch.cond, PooledCondition) and batch.cond.pooled.shape == (4, 32)
    t = torch.rand(4)
    assert model(batch.latents, t, t / 2, batch.cond).shape == batch.latents.shape

    # The memory plan counts the toy network with the toy activation profile.
    plan = plan_from_config(config, 2, 80.0)
    total = sum(p.numel() for p in model.transformer.parameters())
    assert f"total parameters {total:,}" in plan.format_table()
    assert "the toy MLP block" in plan.format_table()

    # The cache stores the family's fields and reads them back as its condition type.
    writer = CacheWriter(tmp_path / "cache", shard_size=3, dtype="float32")
    writer.add(batch, store_uncond_per_item=False)
    writer.set_unconditional(batch.uncond.index(slice(0, 1)))
    manifest = writer.finish({"source": "toy"}, DataStats())
    cache = CachedDataset(manifest.parent)
    assert cache.manifest["format"] == "toy-pooled-cache" and cache.manifest["pooled_dim"] == 32
    again = cache.collate([cache[i] for i in range(4)])
    assert torch.equal(again.cond.pooled, batch.cond.pooled) and torch.equal(again.latents, batch.latents)
    assert torch.equal(again.uncond.pooled, batch.uncond.index([0, 0, 0, 0]).pooled)


def test_qwen_image_spec_states_its_seam_data():
    from twinflow.backbones.qwen_image.config import QwenImageBackboneConfig, LoraSettings

    spec = backbone_spec(None)
    assert spec.family == DEFAULT_FAMILY
    config = QwenImageBackboneConfig(transformer={"num_layers": 1}, lora=LoraSettings(enabled=True,
                                                                                       train_time_embed_2="lora"))
    assert "to_q" in spec.lora_targets(config) and "time_text_embed_2.timestep_embedder.linear_1" in spec.lora_targets(config)
    assert spec.dual_time_rule(config) is QWEN_IMAGE
    assert dataclasses.replace(config, family=DEFAULT_FAMILY) == config


def test_every_listed_family_resolves_and_folders_without_a_spec_are_not_families():
    """A backbone folder still being built (no ``spec.py``) must not break the lookups that walk every
    family (cache format, condition type), as it once did when the SANA folder arrived before its spec."""
    from twinflow.backbones import registry

    root = REPO / "twinflow" / "backbones"
    with_spec = sorted(p.parent.name for p in root.glob("*/spec.py"))
    assert registry._family_packages() == with_spec
    for name in registry.families():
        assert registry.backbone_spec(name).family == name
    assert registry.spec_for_cache_format("no such format") is None
