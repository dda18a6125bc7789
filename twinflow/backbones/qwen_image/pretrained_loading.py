"""Loading a diffusers transformer checkpoint into a model whose parameters ZeRO-3 already partitioned.

diffusers' ``from_pretrained`` builds the model on the meta device and then assigns the loaded tensors,
which cannot work inside ``deepspeed.zero.Init`` (partitioning needs real tensors; the meta ones have no
data). So under ZeRO-3 the trainer builds the model from its ``config.json`` inside ``zero.Init`` and
this module streams the safetensors weights in: module by module, the module's parameters are gathered,
rank 0 copies the checkpoint's values in, and DeepSpeed re-partitions them on exit. No rank ever holds
more than one module's full parameters, and only rank 0 reads the files.

A plain Qwen-Image checkpoint has no ``time_text_embed_2``: it is filled from ``time_text_embed``
(ALGORITHM.md §2). Any other missing key, an unexpected key or a shape mismatch is an error naming it,
raised on every rank before the first gather.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from twinflow.training.distributed import all_ranks_agree
from twinflow.utils.typed_config import ConfigError

from twinflow.utils.partitioned import gathered, is_partitioned
from .transformer import TWIN_PREFIX

PRIMARY_PREFIX = "time_text_embed."


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (single file or a sharded index)."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SAFETENSORS_WEIGHTS_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {key: single for key in f.keys()}
    raise ConfigError(
        f"config key 'pretrained': {folder} holds neither {SAFETENSORS_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}"
    )


def _source_keys(model: nn.Module, available: set[str], twin: bool, folder: Path,
                 prefixes: tuple[str, str] = (PRIMARY_PREFIX, TWIN_PREFIX), twin_from_primary: bool = True
                 ) -> dict[str, str]:
    """Model parameter name -> checkpoint key to read it from (None: keep the model's value; ``prefixes``:
    E1's and E2's)."""
    primary, second = prefixes
    sources, missing = {}, []
    plain = not any(k.startswith(second) for k in available)
    for name, _ in model.named_parameters():
        if name in available:
            sources[name] = name
        elif twin and name.startswith(second) and not twin_from_primary and plain:
            sources[name] = None
        elif twin and name.startswith(second) and primary + name[len(second):] in available:
            sources[name] = primary + name[len(second):]
        else:
            missing.append(name)
    twin_in_checkpoint = [k for k in available if k.startswith(second)]
    if twin_in_checkpoint and any(sources.get(n, n) != n for n in sources if n.startswith(second)):
        raise ConfigError(f"checkpoint {folder} holds only part of {second.rstrip('.')}")
    # Buffers a checkpoint holds (SD3's fixed position table) are computed by the model's constructor.
    unexpected = sorted(available - set(sources.values()) - {name for name, _ in model.named_buffers()})
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {folder} does not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return sources


def _check_shapes(model: nn.Module, sources: dict[str, str], files: dict[str, Path], folder: Path) -> None:
    """Every rank compares the checkpoint's shapes (file headers only) with the model's full shapes
    before any gather, so a mismatch fails on all ranks alike instead of leaving ranks in a collective."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in set(files.values()):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    for name, param in model.named_parameters():
        key = sources[name]
        if key is None:
            continue
        full = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
        if shapes[key] != full:
            raise ConfigError(f"checkpoint {folder}: {key} has shape {shapes[key]}, the model's {name} has {full}")


@torch.no_grad()
def load_checkpoint_into(model: nn.Module, folder: str | Path, twin_embedder: bool,
                         prefixes: tuple[str, str] = (PRIMARY_PREFIX, TWIN_PREFIX), *,
                         twin_from_primary: bool = True) -> None:
    """Copy the checkpoint in ``folder`` into ``model`` (partitioned or not), module by module.

    ``prefixes`` name E1 and E2 (Z-Image passes its own). A plain checkpoint (no E2) fills E2 from E1,
    or with ``twin_from_primary=False`` leaves E2 as the model initialised it (SD3.5's normal(0, 0.02))."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    sources = _source_keys(model, set(files), twin_embedder, folder, prefixes, twin_from_primary)
    _check_shapes(model, sources, files, folder)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    handles: dict[Path, object] = {}

    def read(module_name: str, direct: list[tuple[str, nn.Parameter]]) -> None:
        for param_name, param in direct:
            name = f"{module_name}.{param_name}" if module_name else param_name
            key = sources[name]
            if key is None:
                continue
            if files[key] not in handles:
                handles[files[key]] = safe_open(str(files[key]), framework="pt")
            param.data.copy_(handles[files[key]].get_tensor(key).to(dtype=param.dtype))

    # Rank 0 reads while every rank gathers: a read error must not skip rank 0's part of the collectives.
    try:
        with all_ranks_agree(f"loading {folder} on rank 0") as section:
            for module_name, module in model.named_modules():
                direct = list(module.named_parameters(recurse=False))
                if not direct:
                    continue
                with gathered([p for _, p in direct], modify=True):
                    if rank == 0:
                        section.run(read, module_name, direct)
    finally:
        handles.clear()
