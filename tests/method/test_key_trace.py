"""A method key can be followed by its name alone: from a YAML file, through the config dataclass and the
objective, to the loss kernel. ``enhanced_ratio`` is the example (it used to reach the kernel as an
unnamed positional argument). The checks read source text and syntax trees, as a person searching
would."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from twinflow.method.config import Preset, TwinFlowConfig

REPO = Path(__file__).resolve().parents[2]
KEY = "enhanced_ratio"


def _tree(relative: str) -> ast.Module:
    return ast.parse((REPO / relative).read_text(), filename=relative)


def test_shipped_configs_name_the_key():
    naming = [p.name for p in sorted((REPO / "configs").glob("*.yaml"))
              if KEY in (yaml.safe_load(p.read_text()).get("method") or {})]
    assert "qwen_image_full.yaml" in naming and "qwen_image_lora_1order.yaml" in naming, naming


def test_the_config_dataclass_has_the_key_as_a_field():
    assert KEY in {f.name for f in dataclasses.fields(TwinFlowConfig)}
    assert KEY in {f.name for f in dataclasses.fields(Preset)}  # where its default lives
    assert getattr(TwinFlowConfig(), KEY) == Preset().enhanced_ratio


def test_the_objective_passes_the_key_by_name():
    calls = [node for node in ast.walk(_tree("twinflow/method/objective.py")) if isinstance(node, ast.Call)]
    assert any(kw.arg == KEY for call in calls for kw in call.keywords)


def test_the_loss_kernel_takes_the_key_by_name():
    functions = [node for node in ast.walk(_tree("kernels/twinflow_loss.py")) if isinstance(node, ast.FunctionDef)]
    assert any(KEY in [a.arg for a in fn.args.args + fn.args.kwonlyargs] for fn in functions)


def test_the_backend_choice_passes_the_key_to_the_kernel_by_name():
    """``loss_math.twinflow_loss`` picks the kernel or the reference and hands the value on by name."""
    calls = [node for node in ast.walk(_tree("twinflow/method/loss_math.py")) if isinstance(node, ast.Call)]
    assert any(kw.arg == KEY for call in calls for kw in call.keywords)
