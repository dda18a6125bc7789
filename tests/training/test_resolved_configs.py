"""Every shipped config resolves to the values it resolved to before its method keys were written out.

``data/resolved_configs.json`` is the fully resolved form (``to_dict`` of the loaded :class:`TrainConfig`)
of each YAML under ``configs/``, generated from the code at 21646a3, when unset method keys still came
from a hidden defaults dict; the one key added since, ``model.family: qwen_image`` (the backbone seam's
selector, whose default keeps every file on the backbone it always used), was written into each model
section by hand, not regenerated. Two files are also loaded with every other ``method.preset``: the demo and
the launcher tests switch the preset on them (``method.preset=twinflow`` / ``flow_matching``), so those
files must leave the preset's keys to the preset.

The comparison is exact on every key and value, with one allowance: an int equals the float of the same
value. The presets give ``probs`` as ints and YAML gives floats; every use reads them through
``GroupProbs.as_dict``, which makes floats, so the arithmetic is the same.

Regenerate the snapshot (``python tests/training/test_resolved_configs.py``) only for a change that is
meant to change a shipped config's values, and say so in the commit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from twinflow.method.config import PRESETS
from twinflow.training.config import load_train_config
from twinflow.utils.typed_config import to_dict

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).resolve().parent / "data" / "resolved_configs.json"
PRESET_SWITCHED = ("demo_shapes.yaml", "tiny_cpu.yaml")
"""Configs whose preset is switched by an override (twinflow/demo/main.py, tests/training/dist_worker.py)."""


def cases() -> dict[str, tuple[Path, list[str]]]:
    """Snapshot name -> (config file, overrides)."""
    out = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        out[path.name] = (path, [])
        if path.name in PRESET_SWITCHED:
            for preset in sorted(PRESETS):
                out[f"{path.name} method.preset={preset}"] = (path, [f"method.preset={preset}"])
    return out


def resolved(path: Path, overrides: list[str]) -> str:
    """The resolved config as canonical JSON text. ``model.kernels`` follows CUDA's presence under
    ``kernels: auto``; the snapshot was taken without CUDA, so this is computed without it too."""
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        config = load_train_config(path, overrides)
    finally:
        torch.cuda.is_available = real
    return json.dumps(to_dict(config), sort_keys=True)


def _ints_as_floats(obj):
    if isinstance(obj, dict):
        return {k: _ints_as_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_ints_as_floats(v) for v in obj]
    return float(obj) if isinstance(obj, int) and not isinstance(obj, bool) else obj


def test_the_snapshot_covers_every_shipped_config():
    assert sorted(json.loads(SNAPSHOT.read_text())) == sorted(cases())


@pytest.mark.parametrize("name", sorted(cases()))
def test_shipped_config_resolves_as_before(name):
    path, overrides = cases()[name]
    expected = json.loads(SNAPSHOT.read_text())[name]
    got = json.loads(resolved(path, overrides))
    assert _ints_as_floats(got) == _ints_as_floats(expected), name


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    snapshot = {name: json.loads(resolved(path, overrides)) for name, (path, overrides) in cases().items()}
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(snapshot)} resolved configs to {SNAPSHOT}")
