"""Configuration of the OpenUni backbone (the ``model`` section with ``family: openuni``).

Light on purpose (no diffusers, no transformers, no peft): it is imported whenever a config is loaded.

Every step the reference made users do by editing code is a key here:

* "comment L52 and use the original transformer in L51" (its LoRA recipes): ``twin_embedder: false``;
* "switch to LoRA training": ``lora.enabled: true`` (+ rank, alpha, targets, the EMA adapter);
* which parts of the conditioning train: ``train_query_head`` (the 256 learnable queries, the connector
  and the projector, trained with SANA; the reference's recipes freeze them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from twinflow.utils.typed_config import ConfigError

from ..qwen_image.config import DTYPES
from ..qwen_image.config import LoraSettings as QwenLoraSettings
from .lora import SANA_LORA_TARGETS

FAMILY = "openuni"
FOLDERS = {"internvl": "internvl", "vae": "vae", "transformer": "transformer", "query_head": "query_head"}
"""Sub-folders of an OpenUni model folder (the same names as ``encoders.FOLDERS``; a test keeps them equal)."""
SANA_PREFIX, HEAD_PREFIX = "sana.", "query_head."
"""Parameter name prefixes of the trained network's parts (``backbone.OpenUniGenerator``: ``sana``, ``query_head``)."""
COMPONENTS_FILE = "openuni_components.json"
"""Written by an export beside ``transformer/`` and ``query_head/``: the absolute path of the frozen
``internvl`` folder the run used (an export does not copy the 2B language model)."""


@dataclass
class LoraSettings(QwenLoraSettings):
    """Qwen-Image's LoRA settings with SANA's targets (:data:`.lora.SANA_LORA_TARGETS`).

    ``train_time_embed_2`` defaults to ``lora`` when there is a second embedder (``full`` copies it per
    adapter, which cannot be done on the ZeRO-3 partitioned parameters the trainer builds).
    """

    target_modules: list[str] = field(default_factory=lambda: list(SANA_LORA_TARGETS))


@dataclass
class OpenUniBackboneConfig:
    """Where OpenUni comes from and how it trains.

    ``pretrained``: a local OpenUni folder: ``transformer/`` (SANA, plain or TwinFlow layout),
    ``query_head/`` and ``internvl/`` (the frozen InternVL3; or ``llm`` names it, or an export's
    :data:`COMPONENTS_FILE` does). ``python -m twinflow.backbones.openuni.convert`` writes the first two
    from the reference's ``.pth``. ``train_query_head``: whether the queries, connector and projector train
    (full runs; LoRA runs keep them frozen).
    """

    family: str = FAMILY
    pretrained: str = ""
    llm: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    twin_embedder: bool = True
    train_query_head: bool = True
    kernels: Literal["eager", "triton"] = "eager"
    gradient_checkpointing: bool = False
    edit: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ConfigError(f"config key 'family' is {self.family!r}, but this is the {FAMILY!r} section")
        if not self.pretrained:
            raise ConfigError("config key 'pretrained' must name an OpenUni folder (transformer/, query_head/, "
                              "internvl/); convert the reference's .pth with python -m twinflow.backbones.openuni.convert")
        if self.edit:
            raise ConfigError("config key 'edit': OpenUni has no edit model; set edit: false")
        if self.lora.enabled and self.train_query_head:
            raise ConfigError("config keys 'lora.enabled' and 'train_query_head' conflict: a LoRA run trains SANA's "
                              "adapters only (the EMA adapter covers nothing else); set train_query_head: false")
        if self.lora.train_time_embed_2 is None:
            self.lora.train_time_embed_2 = "lora" if self.twin_embedder else "frozen"
        elif self.lora.train_time_embed_2 != "frozen" and not self.twin_embedder:
            raise ConfigError(f"config key 'lora.train_time_embed_2': {self.lora.train_time_embed_2!r} needs "
                              "twin_embedder: true (there is no time_embed_2 in single-embedder mode)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # ----------------------------------------------------------------------------------- folders
    def folder(self, name: str) -> Path:
        """``pretrained/<name>`` (``transformer``, ``query_head``), checked to hold a ``config.json``."""
        path = Path(self.pretrained) / FOLDERS[name]
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.pretrained': {self.pretrained} has no {FOLDERS[name]}/config.json")
        return path

    def llm_folder(self) -> Path:
        """The InternVL3 folder: ``llm``, else ``pretrained/internvl``, else what an export recorded."""
        if self.llm is not None:
            candidates = [(Path(self.llm), "model.llm")]
        else:
            candidates = [(Path(self.pretrained) / FOLDERS["internvl"], "model.pretrained")]
            record = Path(self.pretrained) / COMPONENTS_FILE
            if record.is_file():
                candidates.append((Path(json.loads(record.read_text())["llm"]), f"{record}"))
        for path, _ in candidates:
            if (path / "config.json").is_file():
                return path
        where = ", ".join(f"{p} (from {key})" for p, key in candidates)
        raise ConfigError(f"config key 'model.llm': no InternVL3 folder with a config.json at {where}")

    def transformer_settings(self) -> dict[str, Any]:
        """SANA's ``config.json`` (:class:`ConfigError` naming the file when it is unusable)."""
        return self._settings("transformer")

    def query_head_settings(self) -> dict[str, Any]:
        """The query head's ``config.json``."""
        return self._settings("query_head")

    def _settings(self, name: str) -> dict[str, Any]:
        file = self.folder(name) / "config.json"
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'model.pretrained': cannot read {file}: {e}") from e
