"""The latent / text-embedding cache: encode once, then train with neither text encoder nor VAE loaded.

Layout of a cache folder::

    manifest.json                     what is in the cache; written last, atomically
    shard-<run>-00000.safetensors     up to shard_size items each
    uncond-<run>.safetensors          text-to-image: the unconditional embedding, stored once

A shard holds ``latents`` (n, C, h, w), ``indices`` (n,) (the raw dataset index of each item) and the
condition *fields* the backbone's cache schema names (``twinflow.backbones.registry.CacheSchema``).
Ragged fields are stored concatenated: for Qwen-Image, ``embeds`` (T, D) is every item's valid text
tokens one after another and ``offsets`` (n + 1,) says where each item's tokens start (item i is
``embeds[offsets[i]:offsets[i+1]]``). No padding is stored, so no mask either: an item's mask is all
true, and batches are padded (mask false) when the schema builds them. Other fields are stacked, e.g.
an edit cache's ``ref_latents`` (n, C, h, w); because the unconditional condition there includes the
reference image, edit caches also store the unconditional fields per item under ``uncond_`` names
(``uncond_embeds`` / ``uncond_offsets``), less the fields it shares with the condition. The manifest's
``format`` names the schema. Item keys (source file / row) are in the shard's safetensors metadata.

A cache of prompts without images (``data.source: prompts``, for ``method.use_image_free``) stores no
``latents``: its manifest says ``prompts_only: true`` and its ``latent_shape`` is that of
``data.image_size`` images under the backbone's latent codec. Its batches carry placeholder latents,
zeros of that shape in the cache's dtype, which the image-free objective replaces by the online model's
one-step samples, reading only their shape, dtype and device. Training refuses such a cache without
``method.use_image_free``.

Crash safety: shards are written under a name unique to the run, each to a temporary name, fsynced and
renamed. The manifest, which alone makes a cache valid, is written the same way only after every shard
is in place, and records each shard's byte size. So an interrupted precompute leaves any previous cache
untouched and never a manifest that points at missing or partial files; the next successful run removes
the leftovers. Run one precompute per cache folder at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from twinflow.backbones.registry import (
    CacheSchema,
    cache_formats,
    spec_for_cache_format,
    spec_for_condition,
    spec_for_encoder_config,
)
from twinflow.utils.atomic_files import atomic_write_json, replace_atomically

from .batch import TrainBatch, placeholder_latents
from .config import DataConfig
from .stats import DataError, DataStats

CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CACHE_FILE = re.compile(r"^(shard|uncond)-[0-9a-f]+(-\d+)?\.safetensors(\.tmp)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNCOND_PREFIX = "uncond_"


# ---------------------------------------------------------------------------------------------- identity
def data_fingerprint(data: DataConfig) -> dict[str, Any]:
    """The settings of the ``data`` section that change what a cache holds (paths made absolute): the
    part of :func:`cache_fingerprint` a training config can check, having no encoder section."""
    return {
        "source": data.source,
        "paths": [str(Path(p).resolve()) for p in data.paths],
        "image_size": data.image_size,
        "caption_column": data.caption_column,
        "image_column": data.image_column,
        "ref_image_column": data.ref_image_column,
        "ref_suffix": data.ref_suffix,
        "image_extensions": list(data.image_extensions),
        "caption_extension": data.caption_extension,
        "cache_dtype": data.cache_dtype,
    }


def cache_fingerprint(data: DataConfig, encoder: Any) -> dict[str, Any]:
    """Every setting that changes what the cache holds (paths made absolute): the data settings and
    those of the backbone's ``encoder`` section."""
    return {**data_fingerprint(data), **spec_for_encoder_config(encoder).encoder_fingerprint(encoder)}


def check_fingerprint(manifest: dict[str, Any], expected: dict[str, Any], cache_dir: str | Path) -> None:
    """:class:`DataError` naming every setting of ``expected`` that the cache's manifest records otherwise
    (a setting the cache does not record counts as different; settings ``expected`` omits are not compared)."""
    found = manifest["fingerprint"]
    differ = sorted(k for k in expected if found.get(k) != expected[k])
    if differ:
        details = "; ".join(f"{k}: cache has {found.get(k)!r}, config has {expected[k]!r}" for k in differ)
        raise DataError(f"cache {cache_dir} was built with other settings ({details}); rebuild it")


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()




def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    replace_atomically(tmp, path)
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------- writing
def _ragged(pieces: list[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([p.shape[0] for p in pieces], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(pieces), offsets


class CacheWriter:
    """Accumulates encoded batches into shards; :meth:`finish` commits the manifest. ``prompts_only``:
    the batches' latents are placeholders (prompts without images); only their shape is recorded."""

    def __init__(self, cache_dir: str | Path, shard_size: int, dtype: str, *, prompts_only: bool = False) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.prompts_only = prompts_only
        self.run_id = f"{int(time.time()):x}{secrets.token_hex(4)}"
        self.shards: list[dict[str, Any]] = []
        self.unconditional: dict[str, Any] | None = None
        self.num_items = 0
        self._rows: list[dict[str, Any]] = []
        self._layout: dict[str, Any] | None = None
        self._schema: CacheSchema | None = None

    def _schema_of(self, cond: Any) -> CacheSchema:
        """The schema of the backbone whose condition type ``cond`` is (one per cache)."""
        schema = spec_for_condition(cond).cache_schema
        if self._schema is None:
            self._schema = schema
        elif schema is not self._schema:
            raise DataError(f"cache batches mix condition types ({schema.format} vs {self._schema.format})")
        return schema

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def add(self, batch: TrainBatch, store_uncond_per_item: bool) -> None:
        """Add a batch's rows; ``store_uncond_per_item`` for edit (the uncond depends on the image)."""
        schema = self._schema_of(batch.cond)
        layout = {
            "latent_shape": list(batch.latents.shape[1:]),
            **schema.layout(batch.cond),
            "uncond_per_item": store_uncond_per_item,
        }
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise DataError(f"cache batches disagree in layout: {layout} vs {self._layout}")
        uncond_rows = schema.rows(batch.uncond) if store_uncond_per_item else None
        for row, fields in enumerate(schema.rows(batch.cond)):
            item = {
                "index": batch.indices[row],
                "key": batch.keys[row],
                **({} if self.prompts_only else {"latents": batch.latents[row].detach().cpu()}),
                **{name: t.detach().cpu() for name, t in fields.items()},
            }
            if uncond_rows is not None:
                item.update({UNCOND_PREFIX + name: t.detach().cpu() for name, t in uncond_rows[row].items()
                             if name not in schema.shared_with_uncond})
            self._rows.append(item)
            if len(self._rows) == self.shard_size:
                self._flush()

    def set_unconditional(self, uncond: Any) -> None:
        """Store the one shared unconditional condition (text-to-image): the fields of its first row."""
        name = f"uncond-{self.run_id}.safetensors"
        fields = self._schema_of(uncond).rows(uncond)[0]
        size = _save_tensors(self.cache_dir / name, {k: self._cast(t.detach().cpu()) for k, t in fields.items()})
        self.unconditional = {"file": name, "bytes": size}

    def _ragged_names(self) -> dict[str, str]:
        """Ragged field -> its offsets tensor, the ``uncond_`` copies included."""
        ragged = dict(self._schema.ragged)
        return {**ragged, **{UNCOND_PREFIX + k: UNCOND_PREFIX + v for k, v in ragged.items()}}

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        tensors = {"indices": torch.tensor([r["index"] for r in rows], dtype=torch.int64)}
        if not self.prompts_only:
            tensors["latents"] = torch.stack([r["latents"] for r in rows]).to(self.dtype)
        ragged = self._ragged_names()
        for field in [k for k in rows[0] if k not in ("index", "key", "latents")]:
            if field in ragged:
                tensors[field], tensors[ragged[field]] = _ragged([self._cast(r[field]) for r in rows])
            else:
                tensors[field] = self._cast(torch.stack([r[field] for r in rows]))
        name = f"shard-{self.run_id}-{len(self.shards):05d}.safetensors"
        size = _save_tensors(self.cache_dir / name, tensors, {"keys": json.dumps([r["key"] for r in rows])})
        self.shards.append({"file": name, "num_items": len(rows), "bytes": size})
        self.num_items += len(rows)

    def finish(self, fingerprint: dict[str, Any], stats: DataStats) -> Path:
        """Write the last shard and the manifest, then delete cache files no manifest refers to."""
        self._flush()
        if self._layout is None or self.num_items == 0:
            raise DataError("nothing to cache: no usable item was encoded")
        if not self._layout["uncond_per_item"] and self.unconditional is None:
            raise DataError("text-to-image cache needs the unconditional embedding (set_unconditional)")
        manifest = {
            "format": self._schema.format,
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "fingerprint_sha256": fingerprint_hash(fingerprint),
            "num_items": self.num_items,
            "dtype": self.dtype_name,
            "prompts_only": self.prompts_only,
            **self._layout,
            "shards": self.shards,
            "unconditional": self.unconditional,
            "skipped": stats.as_dict(),
            "created_unix": int(time.time()),
        }
        path = self.cache_dir / MANIFEST_NAME
        atomic_write_json(path, manifest)
        self.remove_unreferenced()
        return path

    def remove_unreferenced(self) -> None:
        """Delete this folder's cache files (by name pattern) that the current manifest does not list."""
        keep: set[str] = set()
        manifest = self.cache_dir / MANIFEST_NAME
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            keep = {s["file"] for s in data["shards"]}
            if data.get("unconditional"):
                keep.add(data["unconditional"]["file"])
        for file in self.cache_dir.iterdir():
            if _CACHE_FILE.match(file.name) and file.name not in keep:
                file.unlink()


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CachedItem:
    """One cached item: latents (C, h, w) and its condition fields (for Qwen-Image its valid text
    tokens ``embeds`` (L, D) and, for edit, ``ref_latents``); ``uncond_fields`` when stored per item.
    ``latents`` is None in a prompts-only cache (its batches get placeholder latents)."""

    index: int
    key: str
    latents: Tensor | None
    fields: dict[str, Tensor]
    uncond_fields: dict[str, Tensor] | None


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache; :class:`DataError` naming the problem otherwise."""
    folder = Path(cache_dir)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no cache manifest at {path}: the cache was never built or its precompute did not finish; "
            "run `python -m twinflow.data.precompute --config <config>`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"cache manifest {path} is not valid JSON: {e}") from e
    if spec_for_cache_format(manifest.get("format")) is None or manifest.get("version") != CACHE_VERSION:
        raise DataError(
            f"{path} is not a v{CACHE_VERSION} manifest of a known format ({', '.join(cache_formats())}) "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    files = list(manifest["shards"]) + ([manifest["unconditional"]] if manifest.get("unconditional") else [])
    for entry in files:
        file = folder / entry["file"]
        if not file.is_file():
            raise DataError(f"cache file {file} listed in {path} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise DataError(f"cache file {file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
    return manifest


class CachedDataset(torch.utils.data.Dataset):
    """Items of a complete cache; ``collate`` makes :class:`TrainBatch` es with both conditions, built by
    the cache schema its manifest's ``format`` names.

    ``expected_fingerprint`` (see :func:`cache_fingerprint`, or :func:`data_fingerprint` for the data
    settings alone) guards against training on a cache built from other data or models: any difference
    in the settings it names raises :class:`DataError` naming them.
    Tensors come back in the cache's storage dtype, on the CPU. A prompts-only cache's batches have
    placeholder latents: zeros of its ``latent_shape`` (see the module docstring).
    """

    def __init__(self, cache_dir: str | Path, expected_fingerprint: dict[str, Any] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        if expected_fingerprint is not None:
            self._check_fingerprint(expected_fingerprint)
        self.schema: CacheSchema = spec_for_cache_format(self.manifest["format"]).cache_schema
        self.latent_shape: list[int] = list(self.manifest["latent_shape"])
        self.dtype = _DTYPES[self.manifest["dtype"]]
        counts = [s["num_items"] for s in self.manifest["shards"]]
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)])
        ragged = dict(self.schema.ragged)
        if self.uncond_per_item:
            ragged.update({UNCOND_PREFIX + k: UNCOND_PREFIX + v for k, v in self.schema.ragged.items()})
        self._ragged = ragged
        self._offsets: list[dict[str, Tensor]] = []
        self._indices: list[Tensor] = []
        self._keys: list[list[str]] = []
        self._fixed: list[str] = []
        for shard in self.manifest["shards"]:
            with safe_open(str(self.cache_dir / shard["file"]), framework="pt") as f:
                self._offsets.append({field: f.get_tensor(offsets) for field, offsets in ragged.items()})
                self._indices.append(f.get_tensor("indices"))
                self._keys.append(json.loads(f.metadata()["keys"]))
                stored = set(f.keys()) - {"latents", "indices", *ragged, *ragged.values()}
                self._fixed = sorted(stored)
        self._uncond: dict[str, Tensor] | None = None
        if not self.uncond_per_item:
            with safe_open(str(self.cache_dir / self.manifest["unconditional"]["file"]), framework="pt") as f:
                self._uncond = {k: f.get_tensor(k) for k in f.keys()}
        self._handles: dict[int, Any] = {}
        self._owner_pid = os.getpid()

    def _check_fingerprint(self, expected: dict[str, Any]) -> None:
        check_fingerprint(self.manifest, expected, self.cache_dir)

    @property
    def prompts_only(self) -> bool:
        """Whether the cache holds prompts without images (no latents; placeholders in batches)."""
        return bool(self.manifest.get("prompts_only", False))

    @property
    def uncond_per_item(self) -> bool:
        return bool(self.manifest["uncond_per_item"])

    @property
    def has_reference(self) -> bool:
        return self.schema.has_reference(self.manifest)

    @property
    def skipped_at_precompute(self) -> dict[str, int]:
        """What the precompute skipped, per reason."""
        return dict(self.manifest["skipped"])

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> Any:
        if self._owner_pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._handles, self._owner_pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.cache_dir / self.manifest["shards"][shard]["file"]), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> CachedItem:
        if not 0 <= index < len(self):
            raise IndexError(f"cache item {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        local = index - int(self._shard_starts[shard])
        f = self._handle(shard)
        stored = {}
        for field, offsets in self._offsets[shard].items():
            start, end = offsets[local : local + 2].tolist()
            stored[field] = f.get_slice(field)[start:end]
        for field in self._fixed:
            stored[field] = f.get_slice(field)[local : local + 1][0]
        fields = {k: v for k, v in stored.items() if not k.startswith(UNCOND_PREFIX)}
        uncond = None
        if self.uncond_per_item:
            uncond = {k[len(UNCOND_PREFIX):]: v for k, v in stored.items() if k.startswith(UNCOND_PREFIX)}
        return CachedItem(
            index=int(self._indices[shard][local]),
            key=self._keys[shard][local],
            latents=None if self.prompts_only else f.get_slice("latents")[local : local + 1][0],
            fields=fields,
            uncond_fields=uncond,
        )

    def unconditional(self, batch_size: int) -> Any:
        """Text-to-image: the stored unconditional condition repeated ``batch_size`` times."""
        if self._uncond is None:
            raise DataError("this edit cache stores one unconditional condition per item; use collate()")
        return self.schema.collate([self._uncond] * batch_size)

    def collate(self, items: list[CachedItem]) -> TrainBatch:
        cond = self.schema.collate([i.fields for i in items])
        if self.uncond_per_item:
            shared = self.schema.shared_with_uncond
            uncond = self.schema.collate([
                {**i.uncond_fields, **{k: v for k, v in i.fields.items() if k in shared}} for i in items  # type: ignore[dict-item]
            ])
        else:
            uncond = self.unconditional(len(items))
        if self.prompts_only:
            latents = placeholder_latents(len(items), self.latent_shape, self.dtype)
        else:
            latents = torch.stack([i.latents for i in items])  # type: ignore[misc]
        return TrainBatch(
            latents=latents,
            cond=cond,
            uncond=uncond,
            indices=[i.index for i in items],
            keys=[i.key for i in items],
        )
