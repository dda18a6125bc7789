"""Loading a pretrained checkpoint into a dual-time transformer whose second time embedder it may lack.

A base-model checkpoint (plain Qwen-Image, plain SANA) has no second embedder: it is filled by the
backbone's own rule (a copy of the first, or a fresh initialisation). A TwinFlow checkpoint has it
and keeps its values. A checkpoint holding only some of its keys is an error naming them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

logger = logging.getLogger(__name__)


def fill_missing_second_embedder(
    model: nn.Module, info: dict[str, Any], name: str, fill: Callable[[], None], source: Any, how: str
) -> None:
    """After diffusers' ``from_pretrained(..., output_loading_info=True)``: if ``info`` reports every key
    of submodule ``name`` missing, run ``fill()`` and drop those keys from ``info["missing_keys"]``."""
    prefix = name + "."
    missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if not missing:
        return
    if missing != sorted(prefix + k for k in model.get_submodule(name).state_dict()):
        raise ValueError(f"checkpoint {source} holds only part of {name}: missing {missing}")
    fill()
    logger.info("%s has no %s: initialised it %s", source, name, how)
    info["missing_keys"] = [k for k in info["missing_keys"] if not k.startswith(prefix)]
