"""The strict typed config loader."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from twinflow.utils.typed_config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclass
class Inner:
    rate: float = 0.5
    pair: tuple[float, float] = (0.0, 1.0)
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    maybe: Optional[Inner] = None


def test_nested_values_and_tuples():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "pair": [0.25, 0.75], "names": ["x"]}})
    assert cfg.inner.pair == (0.25, 0.75) and cfg.inner.rate == 1.0 and cfg.inner.names == ["x"]
    assert to_dict(cfg)["inner"]["pair"] == [0.25, 0.75]
    # YAML 1.1 reads 1e-3 (no dot) as a string; float keys accept it, other strings stay errors
    assert load_config(Inner, None, ["rate=1e-3"]).rate == 1e-3
    with pytest.raises(ConfigError, match="'rate': expected a number"):
        load_config(Inner, None, ["rate=fast"])
    assert from_dict(Outer, {"steps": 1, "maybe": {"rate": 2.0}}).maybe.rate == 2.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": 1, "stepz": 2}, "'stepz'"),
        ({"steps": 1, "inner": {"rat": 1}}, "'inner.rat'"),
        ({"steps": "3"}, "'steps': expected an integer"),
        ({"steps": True}, "'steps': expected an integer"),
        ({"steps": 1, "mode": "c"}, "'mode': 'c' is not one of"),
        ({"steps": 1, "inner": {"pair": [1.0]}}, "'inner.pair': expected 2 items"),
        ({"steps": 1, "inner": {"pair": [1.0, "x"]}}, r"'inner.pair\[1\]'"),
        ({"steps": 1, "maybe": {"rat": 1}}, "'maybe.rat'"),
        ({}, "'steps' is required"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\ninner:\n  rate: 0.1\n")
    cfg = load_config(Outer, path, ["inner.rate=0.3", "inner.pair=[0.1, 0.2]", "mode=b"])
    assert (cfg.steps, cfg.mode, cfg.inner.rate, cfg.inner.pair) == (2, "b", 0.3, (0.1, 0.2))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        apply_overrides({"steps": 1}, ["steps.x=1"])
