"""Durable, all-or-nothing file writes: checkpoints and the data cache never leave a half-written file
under a final name.

A file is written under a temporary name, flushed to disk, renamed over its final name (``os.replace``
is atomic on POSIX) and the folder entry is flushed too, so after a crash the final name holds either
the old complete file or the new complete one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` and flush it to disk (the caller renames or commits the folder)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(tmp: Path, final: Path) -> None:
    """Flush ``tmp``, rename it over ``final`` and flush the folder: ``final`` is whole or unchanged."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    replace_atomically(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))
