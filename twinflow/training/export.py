"""Export a run's transformer (online or EMA weights) as a diffusers model folder, or its LoRA adapter.

Two sources, one writer:

* a live run (:func:`export_from_trainer`, collective): each parameter is gathered in turn with
  ``deepspeed.zero.GatheredParameters`` and copied to rank 0's CPU; for the EMA the gathering runs inside
  the teacher's session, i.e. with the EMA shards swapped into the partitions (full models) or with the
  ``ema`` adapter present in the gathered state (LoRA). At most one gathered parameter exists at a time.
* a checkpoint (:func:`export_checkpoint`, one process, no DeepSpeed): every rank's saved partitions
  are concatenated per parameter using the layout recorded in ``meta.json``. This is what
  ``twinflow export --checkpoint DIR --out DIR`` runs.

The writer (rank 0) writes into a temporary folder renamed into place at the end. What goes into it
is the backbone family's export layout (``BackboneSpec.write_export``; for Qwen-Image see
``twinflow.backbones.qwen_image.export``), plus :data:`EXPORT_RECORD`, which names the family.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from twinflow.backbones.registry import backbone_spec
from twinflow.utils.typed_config import from_dict

from .checkpoint import (
    META_CONFIG,
    META_LAYOUT,
    CheckpointError,
    ema_adapter_key,
    ema_shard_key,
    load_rank_tensors,
    master_key,
    read_meta,
)
from .distributed import all_ranks_agree

Weights = Literal["online", "ema"]
BACKBONE_PREFIX = "transformer."
EXPORT_RECORD = "twinflow_export.json"
"""Written beside the weights: which weights, the backbone ``family``, and what ``twinflow sample``
needs to draw from them (``sampling``: the encoder folder, the latent codec and the image size the run
trained with)."""


class ExportError(RuntimeError):
    """The requested export is not possible; the message says why."""


# --------------------------------------------------------------------------------------------- writer
def sampling_record(data: Any) -> dict[str, Any]:
    """What the run's data says about sampling from its model. ``data`` is the run's ``data`` section
    (the dataclass, or its dict from ``meta.json``). With a cache, its fingerprint names the encoder
    folder, the latent codec and the image size; without one (or when the cache is gone) only the image
    size and the VAE codec are known, and ``twinflow sample`` needs ``--encoders``."""
    from twinflow.data.cache import read_manifest
    from twinflow.data.latent_codec import VAE
    from twinflow.data.stats import DataError

    get = data.get if isinstance(data, dict) else lambda key, default=None: getattr(data, key, default)
    record: dict[str, Any] = {"latent_codec": VAE, "image_size": get("image_size"), "encoders": None}
    if get("use_cache") and get("cache_dir"):
        try:
            fingerprint = read_manifest(get("cache_dir"))["fingerprint"]
        except DataError:
            return record
        record.update(latent_codec=fingerprint.get("latent_codec", VAE), encoders=fingerprint.get("model_path"),
                      image_size=fingerprint.get("image_size", record["image_size"]))
    return record


def read_export_record(folder: str | Path) -> dict[str, Any]:
    """The export's record (empty for folders written by something else, e.g. a published model)."""
    path = Path(folder) / EXPORT_RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from e


def write_export(state: dict[str, torch.Tensor], transformer_config: dict[str, Any], model_config: Any,
                 out: str | Path, *, weights: Weights, merge_lora: bool = False,
                 sampling: Optional[dict[str, Any]] = None) -> Path:
    """Write ``state`` (the transformer's full state dict) as described in the module docstring."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if merge_lora and not model_config.lora.enabled:
        raise ExportError("merge_lora is for LoRA runs; this model has no adapters")
    spec = backbone_spec(model_config)
    spec.write_export(state, transformer_config, model_config, tmp, weights=weights, merge_lora=merge_lora)
    record = {"weights": weights, "merged_lora": merge_lora, "family": spec.family, "sampling": sampling or {}}
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


# ----------------------------------------------------------------------------------------- live runs
def gather_transformer_state(backbone: nn.Module, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the transformer's full state dict on rank 0 (CPU), ``None`` elsewhere."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    transformer = backbone.transformer
    # Rank 0's copies (host memory can run out) must not skip the other ranks' gathers: see the helper.
    with all_ranks_agree("gathering the transformer's weights on rank 0") as section:
        for name, param in transformer.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0:
                    section.run(_copy_to_cpu, state, name, param)
        if rank == 0:
            for name, buf in transformer.named_buffers():
                if name not in state:
                    section.run(_copy_to_cpu, state, name, buf)
    return state if rank == 0 else None


def _copy_to_cpu(state: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    state[name] = tensor.detach().to("cpu", copy=True)


def export_from_trainer(trainer: Any, out: str | Path, *, weights: Weights = "ema", merge_lora: bool = False) -> Optional[Path]:
    """Collective: export ``trainer``'s current online or EMA (teacher) weights; the path on rank 0."""
    if weights == "ema":
        from twinflow.method.teachers import TeacherKind

        if TeacherKind.from_decay_rate(trainer.config.method.ema_decay_rate) is TeacherKind.ONLINE:
            raise ExportError("weights='ema' but method.ema_decay_rate is 0: the run has no EMA teacher")
        with trainer.teacher.session():
            state = gather_transformer_state(trainer.backbone, trainer.dist.rank)
    else:
        state = gather_transformer_state(trainer.backbone, trainer.dist.rank)
    path = None
    with all_ranks_agree(f"export to {out}"):
        if trainer.dist.is_main:
            path = write_export(state, dict(trainer.backbone.transformer.config), trainer.config.model, out,
                                weights=weights, merge_lora=merge_lora, sampling=sampling_record(trainer.config.data))
    return path


# ---------------------------------------------------------------------------------------- checkpoints
def export_layout(backbone: nn.Module, optimizer: Any) -> dict[str, Any]:
    """What :func:`export_checkpoint` needs to reassemble parameters from per-rank partitions; stored
    in ``meta.json`` (under :data:`~.checkpoint.META_LAYOUT`) by the trainer."""
    from twinflow.method.teachers.adapter import adapter_pairs
    from twinflow.method.teachers.zero3 import zero3_slots

    layout: dict[str, Any] = {
        "transformer_config": json.loads(json.dumps(dict(backbone.transformer.config), default=list)),
        "trainable": [
            {"name": s.name, "shape": list(s.param.ds_shape), "group": s.group, "offset": s.offset, "numel": s.numel}
            for s in zero3_slots(backbone, optimizer)
        ],
    }
    if getattr(backbone.transformer, "peft_config", None):
        names = {id(p): n for n, p in backbone.named_parameters()}
        layout["lora_ema"] = [
            {"name": names[id(ema)], "shape": list(ema.ds_shape), "numel": ema.ds_tensor.numel()}
            for ema, _ in adapter_pairs(backbone)
        ]
    return layout


def _assemble(pieces: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    return torch.cat([p.reshape(-1) for p in pieces])[:numel].view(shape)


def consolidate_checkpoint(checkpoint: str | Path, weights: Weights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, weights by backbone parameter name)`` reassembled from a checkpoint's partitions."""
    ckpt = Path(checkpoint)
    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    layout = meta[META_LAYOUT]
    ranks = [load_rank_tensors(ckpt, r) for r in range(meta["world_size"])]
    lora = "lora_ema" in layout
    if weights == "ema" and not lora and ema_shard_key(0) not in ranks[0]:
        raise ExportError(f"{ckpt} holds no EMA shards (method.ema_decay_rate was 0 or 1); export weights='online'")
    key_of = ema_shard_key if weights == "ema" and not lora else master_key
    out = {}
    for entry in layout["trainable"]:
        key = key_of(entry["group"])
        pieces = [r[key].narrow(0, entry["offset"], entry["numel"]) for r in ranks]
        out[entry["name"]] = _assemble(pieces, entry["shape"])
    for i, entry in enumerate(layout.get("lora_ema", [])):
        out[entry["name"]] = _assemble([r[ema_adapter_key(i)] for r in ranks], entry["shape"])
    return meta, out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, weights: Weights = "ema", merge_lora: bool = False) -> Path:
    """Export from a checkpoint folder in this process (no DeepSpeed, no GPU). Parameters the run did
    not train (a LoRA run's base model) come from ``model.pretrained`` of the run's config."""
    meta, trained = consolidate_checkpoint(checkpoint, weights)
    spec = backbone_spec(meta[META_CONFIG]["model"].get("family"))
    model_config = from_dict(spec.config_type, meta[META_CONFIG]["model"], prefix="model.")
    transformer_config = meta[META_LAYOUT]["transformer_config"]
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in trained.items()}
    missing = sorted(spec.export_keys(transformer_config, model_config) - set(state))
    if missing:
        if model_config.pretrained is None:
            raise ExportError(f"checkpoint {checkpoint} lacks untrained parameters {missing[:5]}... and the run had no model.pretrained")
        base = spec.builder()(model_config, "cpu").transformer.state_dict()
        state.update({k: base[k] for k in missing})
    return write_export(state, transformer_config, model_config, out, weights=weights, merge_lora=merge_lora,
                        sampling=sampling_record(meta[META_CONFIG].get("data", {})))


def main(argv: Optional[list[str]] = None) -> int:
    """``twinflow export --checkpoint DIR --out DIR [--weights ema|online] [--merge-lora]``."""
    parser = argparse.ArgumentParser(prog="twinflow export", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--weights", choices=["ema", "online"], default="ema")
    parser.add_argument("--merge-lora", action="store_true", help="LoRA runs: also write the merged transformer")
    args = parser.parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.out, weights=args.weights, merge_lora=args.merge_lora)
    print(f"exported {args.weights} weights to {path}")
    return 0
