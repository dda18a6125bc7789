"""OpenUni's export layout (written by ``twinflow.training.export``): an OpenUni folder that
``model.pretrained`` and ``twinflow sample --model`` read back.

* ``transformer/``: SANA's ``save_pretrained`` (``time_embed_2.*`` beside diffusers' keys, the TwinFlow
  layout), loadable with ``TwinFlowSanaTransformer.from_pretrained``. LoRA runs write the adapter in
  ``SanaPipeline``'s LoRA format under ``lora/`` instead and, with ``merge_lora``, the merged SANA under
  ``transformer/``.
* ``query_head/``: the queries, connector and projector (``OpenUniQueryHead.save_pretrained``).
* :data:`~.config.COMPONENTS_FILE`: where the frozen InternVL3 the run used lives (not copied: 2B weights
  that never changed). The DC-AE and the tokenizer come from the encoder folder the export record names.

The exported state's keys are the generator's (``sana.*``, ``query_head.*``); both modules are built on
the ``meta`` device and the weights assigned, so nothing is initialised twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..qwen_image.export import plain_transformer, save_transformer
from .config import COMPONENTS_FILE, FOLDERS, HEAD_PREFIX, SANA_PREFIX, OpenUniBackboneConfig
from .lora import add_lora
from .query_head import OpenUniQueryHead, QueryHeadConfig
from .transformer import TwinFlowSanaTransformer


def _plain(generator_config: Mapping[str, Any], model_config: OpenUniBackboneConfig) -> tuple[nn.Module, nn.Module]:
    """SANA (with LoRA layers when configured) and the query head on the meta device, weights unset."""
    sana_config = {k: v for k, v in generator_config["sana"].items() if k != "kernels"}
    sana = plain_transformer(sana_config, model_config, cls=TwinFlowSanaTransformer, inject=add_lora)
    with torch.device("meta"):
        head = OpenUniQueryHead(QueryHeadConfig(**generator_config["query_head"]))
    return sana, head


def export_keys(generator_config: Mapping[str, Any], model_config: OpenUniBackboneConfig) -> set[str]:
    """The state-dict keys an export writes."""
    sana, head = _plain(generator_config, model_config)
    return {SANA_PREFIX + k for k in sana.state_dict()} | {HEAD_PREFIX + k for k in head.state_dict()}


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def write_openuni(state: dict[str, torch.Tensor], generator_config: Mapping[str, Any],
                  model_config: OpenUniBackboneConfig, folder: Path, *, weights: str, merge_lora: bool) -> None:
    """Write ``state`` (the generator's full state dict) into ``folder`` (see the module docstring)."""
    from diffusers import SanaPipeline

    unknown = sorted(k for k in state if not k.startswith((SANA_PREFIX, HEAD_PREFIX)))
    if unknown:
        raise ValueError(f"OpenUni export: keys outside sana.* and query_head.*: {unknown[:5]}")
    sana, head = _plain(generator_config, model_config)
    target = folder if model_config.lora.enabled else folder / FOLDERS["transformer"]
    save_transformer(sana, _part(state, SANA_PREFIX), model_config, target, pipeline=SanaPipeline, weights=weights,
                     merge_lora=merge_lora)
    head.load_state_dict({k: v.to(model_config.torch_dtype) for k, v in _part(state, HEAD_PREFIX).items()},
                         strict=True, assign=True)
    head.save_pretrained(folder / FOLDERS["query_head"])
    llm = model_config.llm_folder().resolve()
    (folder / COMPONENTS_FILE).write_text(json.dumps({"llm": str(llm)}, indent=1) + "\n")
