"""The reference's OpenUni checkpoint (``openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth``).

The file is a torch pickle of one state dict of the reference's ``OpenUniInternVL3SANAHF`` (written by
OpenUni's ``deepspeed2torch.py``), possibly wrapped as ``{"state_dict": ...}`` or ``{"module": ...}``.
It is read with ``torch.load(weights_only=True)`` only: a file that needs more than tensors and plain
containers to unpickle is refused, naming the file (a pickle can run code). Its keys:

=====================================  ============================================================
reference key                          our module
=====================================  ============================================================
``transformer.<k>``                    SANA (:class:`~.transformer.TwinFlowSanaTransformer`) ``<k>``
``connector.<k>``                      :class:`~.query_head.OpenUniQueryHead` ``connector.<k>``
``projector.<k>``                      query head ``projector.<k>``
``meta_queries``                       query head ``meta_queries``
``lmm.*``, ``vae.*``                   ignored: frozen InternVL3 and DC-AE, loaded from their own folders
=====================================  ============================================================

The TwinFlow reference moves connector and projector under its wrapper before loading
(``transformer.transformer.*``, ``transformer.connector.*``, ``transformer.projector.*``); that layout is
accepted too. Any other key, a missing key or a shape mismatch is an error naming it. The checkpoint
has no ``time_embed_2`` (OpenUni is not a TwinFlow model): it is left as initialised.

:func:`convert_reference_checkpoint` is the one-time conversion to safetensors folders
(``transformer/`` in diffusers' layout, ``query_head/``), after which the pickle is never read again.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .encoders import FOLDERS
from .query_head import OpenUniQueryHead, QueryHeadConfig
from .transformer import TWIN_PREFIX, TwinFlowSanaTransformer

IGNORED_PREFIXES = ("lmm.", "vae.")
_HEAD_PREFIXES = ("connector.", "projector.")


class ReferenceCheckpointError(ValueError):
    """The reference checkpoint cannot be read safely or does not fit the model."""


def load_reference_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The checkpoint's flat ``{key: tensor}``, read with ``weights_only=True``."""
    path = Path(path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ReferenceCheckpointError(
            f"{path} needs more than tensors to unpickle; refusing to load it (weights_only=True): {e}"
        ) from e
    for wrapper in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ReferenceCheckpointError(f"{path} is not a state dict of tensors")
    return dict(obj)


@dataclass
class ReferenceWeights:
    """A reference state dict split by destination module (keys already in our modules' names)."""

    transformer: dict[str, Tensor] = field(default_factory=dict)
    query_head: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def split_reference_state_dict(state: dict[str, Tensor], source: str = "checkpoint") -> ReferenceWeights:
    """Route every key of the reference layout (either variant) to our module and name."""
    out, unknown = ReferenceWeights(), []
    for key, value in state.items():
        if key.startswith("transformer.") and key[len("transformer."):].startswith(("transformer.",) + _HEAD_PREFIXES):
            key = key[len("transformer."):]  # the TwinFlow reference's wrapped layout
        if key.startswith(IGNORED_PREFIXES):
            out.ignored.append(key)
        elif key == "meta_queries" or key.startswith(_HEAD_PREFIXES):
            out.query_head[key] = value
        elif key.startswith("transformer."):
            out.transformer[key[len("transformer."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ReferenceCheckpointError(f"{source}: keys outside the OpenUni layout: {sorted(unknown)[:8]}")
    return out


def _load_strict(module: nn.Module, weights: dict[str, Tensor], name: str, source: str, optional: str = "") -> None:
    """Copy ``weights`` into ``module``; keys under ``optional`` may be absent, nothing else may differ."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in weights and not (optional and k.startswith(optional)))
    unexpected = sorted(k for k in weights if k not in own)
    if missing or unexpected:
        raise ReferenceCheckpointError(
            f"{source} does not fit the {name}: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for key, value in weights.items():
        if own[key].shape != value.shape:
            raise ReferenceCheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, the {name}'s has {tuple(own[key].shape)}"
            )
    module.load_state_dict(weights, strict=False)


def _load_weights(weights: ReferenceWeights, transformer: nn.Module, query_head: nn.Module, source: str) -> None:
    _load_strict(transformer, weights.transformer, "SANA transformer", source, optional=TWIN_PREFIX)
    _load_strict(query_head, weights.query_head, "query head", source)


def load_reference_checkpoint(
    path: str | Path, transformer: TwinFlowSanaTransformer, query_head: OpenUniQueryHead
) -> list[str]:
    """Load the reference ``.pth`` into ``transformer`` and ``query_head``; returns the ignored keys."""
    weights = split_reference_state_dict(load_reference_state_dict(path), str(path))
    _load_weights(weights, transformer, query_head, str(path))
    return weights.ignored


def convert_reference_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    transformer_config: dict[str, Any] | str | Path,
    head_config: QueryHeadConfig | None = None,
) -> Path:
    """One-time conversion of the ``.pth`` to ``out_dir/transformer/`` (diffusers' layout, plain SANA: no
    ``time_embed_2``, which the reference model never had) and ``out_dir/query_head/`` (safetensors), in the
    checkpoint's dtype. A plain folder serves both modes: a dual-time model initialises ``time_embed_2`` when
    it loads it (normal(0, 0.02)), a single-embedder one (the LoRA recipes) loads it as it is.

    ``transformer_config`` is SANA's config: a dict, or the folder holding its ``config.json`` (e.g.
    Sana_1600M_512px_diffusers' ``transformer/``). ``head_config`` defaults to OpenUni-L's. Only paths
    and configs go in, so a command line can call this directly. Keys the conversion ignored are listed
    in ``out_dir/ignored_keys.txt``.
    """
    out_dir = Path(out_dir)
    if not isinstance(transformer_config, dict):
        transformer_config = TwinFlowSanaTransformer.load_config(str(transformer_config), local_files_only=True)
    weights = split_reference_state_dict(load_reference_state_dict(path), str(path))
    dtype = next(iter(weights.transformer.values())).dtype if weights.transformer else torch.float32
    plain = {k: v for k, v in transformer_config.items() if k != "kernels"}
    transformer = TwinFlowSanaTransformer.from_config({**plain, "twin_embedder": False})
    query_head = OpenUniQueryHead(head_config or QueryHeadConfig())
    for module in (transformer, query_head):
        nn.Module.to(module, dtype=dtype)  # nn.Module's: diffusers' override warns about keep-in-fp32 modules
    _load_weights(weights, transformer, query_head, str(path))
    transformer.save_pretrained(out_dir / FOLDERS["transformer"])
    query_head.save_pretrained(out_dir / FOLDERS["query_head"])
    (out_dir / "ignored_keys.txt").write_text("".join(k + "\n" for k in sorted(weights.ignored)))
    return out_dir
