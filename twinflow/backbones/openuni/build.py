"""Build the OpenUni backbone from its config (called by the trainer inside ``deepspeed.zero.Init``).

Everything is imported when this module is imported, not inside the call (importing diffusers or
transformers for the first time inside ``zero.Init`` fails).

* SANA (``transformer/``) and the query head (``query_head/``) are what trains: built from their
  ``config.json`` and, under ZeRO-3, their safetensors streamed into the partitions by Qwen-Image's loader
  (a plain SANA checkpoint keeps ``time_embed_2``'s normal(0, 0.02) initialisation; a TwinFlow one loads
  its ``time_embed_2.*``). Outside ZeRO-3 they load with ``from_pretrained``.
* The InternVL3 language model is loaded *outside* ``zero.Init`` (the context is paused around it), whole
  on every rank, frozen, in the compute dtype: see ``backbone.py`` for why it is not partitioned. Only
  its language model is kept; the vision tower and the vocabulary head are dropped.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import InternVLForConditionalGeneration

from twinflow.backbones.diffusers_family import place_and_adapt
from twinflow.utils.partitioned import zero_init_active
from twinflow.utils.typed_config import ConfigError

from ..qwen_image.pretrained_loading import load_checkpoint_into
from .backbone import OpenUniBackbone, OpenUniGenerator
from .config import OpenUniBackboneConfig
from .lora import add_lora
from .query_head import OpenUniQueryHead, QueryHeadConfig
from .transformer import TWIN_PREFIX, TwinFlowSanaTransformer

PRIMARY_PREFIX = "time_embed."


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Pause an active ``deepspeed.zero.Init``: modules built inside are ordinary (not partitioned).
    DeepSpeed's own pair for this (``shutdown_init_context`` / ``restore_init_context``)."""
    if not zero_init_active():
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def load_frozen_llm(config: OpenUniBackboneConfig, device: torch.device | str) -> torch.nn.Module:
    """InternVL3's language model (a transformers decoder), frozen, in ``config``'s dtype on ``device``."""
    folder = config.llm_folder()
    with outside_zero_init():
        internvl = InternVLForConditionalGeneration.from_pretrained(str(folder), dtype=config.torch_dtype,
                                                                    local_files_only=True)
        llm = internvl.model.language_model
        del internvl
    # The LLM is outside the engine, so engine.train()/eval() never reach it, and it trains in train mode when
    # checkpointed (backbone.py): a dropout would then randomise the teacher's and the sampler's passes.
    dropout = float(getattr(llm.config, "attention_dropout", 0.0) or 0.0)
    if dropout:
        raise ConfigError(f"config key 'model.llm': {folder} has attention_dropout {dropout}; the frozen language "
                          "model must run without dropout (set it to 0 in its config.json)")
    return llm.to(device).eval().requires_grad_(False)


def _load_trained(config: OpenUniBackboneConfig) -> tuple[TwinFlowSanaTransformer, OpenUniQueryHead]:
    sana_folder, head_folder = config.folder("transformer"), config.folder("query_head")
    extra = {"twin_embedder": config.twin_embedder}
    head_config = QueryHeadConfig(**config.query_head_settings())
    if zero_init_active():
        saved = TwinFlowSanaTransformer.load_config(str(sana_folder), local_files_only=True)
        saved = {k: v for k, v in saved.items() if k != "kernels"}
        sana = TwinFlowSanaTransformer.from_config({**saved, **extra})
        load_checkpoint_into(sana, sana_folder, config.twin_embedder, prefixes=(PRIMARY_PREFIX, TWIN_PREFIX),
                             twin_from_primary=False)
        head = OpenUniQueryHead(head_config)
        load_checkpoint_into(head, head_folder, False)
        return sana, head
    sana = TwinFlowSanaTransformer.from_pretrained(str(sana_folder), torch_dtype=config.torch_dtype,
                                                   local_files_only=True, **extra)
    head = OpenUniQueryHead.from_pretrained(head_folder, dtype=config.torch_dtype)
    return sana, head


def build_openuni_backbone(config: OpenUniBackboneConfig, device: torch.device | str) -> OpenUniBackbone:
    """The :class:`~.backbone.OpenUniBackbone` described by ``config``, on ``device`` (offline)."""
    try:
        sana, head = _load_trained(config)
    except TypeError as e:
        raise ConfigError(f"config key 'model.pretrained': {e}") from e
    sana.use_kernels(config.kernels)  # before LoRA, whose injection rebinds the fused module
    place_and_adapt(sana, config, device, add_lora)
    if not any(hasattr(p, "ds_id") for p in head.parameters()):
        head.to(device=device, dtype=config.torch_dtype)
    head.requires_grad_(config.train_query_head)
    llm = load_frozen_llm(config, device)
    backbone = OpenUniBackbone(OpenUniGenerator(sana, head), llm, dtype=config.torch_dtype)
    backbone.set_gradient_checkpointing(config.gradient_checkpointing)
    return backbone
