"""Raw datasets: Parquet shards and folders of image + caption files, and prompts without images.

An index of candidate items is built when the dataset is created (captions are read then, so a
missing caption is known up front); images are decoded when an item is requested. An item that cannot
be used comes back as a :class:`Skipped` record rather than an exception, so that DataLoader worker
processes can hand it to the process that counts (see :mod:`twinflow.data.loader`).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .batch import RawBatch
from .config import DataConfig
from .images import ImageDecodeError, load_image_tensor
from .stats import DataError, DataStats, Skipped, SkipReason


@dataclass
class RawSample:
    """One decoded item: (3, S, S) pixels in [-1, 1], caption, optional reference pixels."""

    index: int
    key: str
    caption: str
    pixels: Tensor
    ref_pixels: Tensor | None


class RawImageTextDataset(torch.utils.data.Dataset):
    """Common part of the raw datasets: ``dataset[i]`` is a :class:`RawSample` or a :class:`Skipped`.

    ``scan_stats`` holds what was skipped while building the index (missing captions, stray files).
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.scan_stats = DataStats()

    @property
    def has_reference(self) -> bool:
        return self.config.has_reference

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> RawSample | Skipped:
        raise NotImplementedError

    def _check_not_empty(self, where: str) -> None:
        if len(self) == 0:
            raise DataError(f"no usable item in {where}; {self.scan_stats.summary()}")

    def _decode(self, index: int, key: str, caption: str, image: bytes | None, ref: bytes | None) -> RawSample | Skipped:
        size, limit = self.config.image_size, self.config.max_image_pixels
        if image is None:
            return Skipped(index, key, SkipReason.MISSING_IMAGE)
        try:
            pixels = load_image_tensor(image, size, limit)
        except ImageDecodeError as e:
            return Skipped(index, key, e.reason, str(e))
        ref_pixels = None
        if self.has_reference:
            if ref is None:
                return Skipped(index, key, SkipReason.MISSING_REFERENCE)
            try:
                ref_pixels = load_image_tensor(ref, size, limit)
            except ImageDecodeError as e:
                reason = e.reason if e.reason is SkipReason.IMAGE_TOO_LARGE else SkipReason.CORRUPT_REFERENCE
                return Skipped(index, key, reason, f"reference: {e}")
        return RawSample(index, key, caption, pixels, ref_pixels)

    @staticmethod
    def collate(samples: list[RawSample]) -> RawBatch:
        refs = [s.ref_pixels for s in samples]
        return RawBatch(
            pixels=torch.stack([s.pixels for s in samples]),
            captions=[s.caption for s in samples],
            ref_pixels=None if refs[0] is None else torch.stack(refs),  # type: ignore[arg-type]
            indices=[s.index for s in samples],
            keys=[s.key for s in samples],
        )


# ---------------------------------------------------------------------------------------------- parquet
def _parquet_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise DataError(f"data.paths: folder {path} contains no .parquet file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data.paths: {path} does not exist")
    return files


def _open_parquet(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{file} is not a readable Parquet file: {e}") from e


def _caption_values(file: Path, handle: pq.ParquetFile, column: str) -> list[str | None]:
    """Every row's value of the string column ``column`` (``data.caption_column``), nulls included."""
    schema = handle.schema_arrow
    if column not in schema.names:
        raise DataError(f"{file}: column '{column}' (data.caption_column) not found; columns are {schema.names}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{file}: caption column '{column}' (data.caption_column) has type {kind}, expected string")
    return handle.read(columns=[column]).column(0).to_pylist()


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _check_image_column(file: Path, schema: pa.Schema, column: str, config_key: str) -> None:
    if column not in schema.names:
        raise DataError(f"{file}: column '{column}' ({config_key}) not found; columns are {schema.names}")
    t = schema.field(column).type
    if _is_binary(t):
        return
    if pa.types.is_struct(t) and "bytes" in [t.field(i).name for i in range(t.num_fields)]:
        if _is_binary(t.field("bytes").type):
            return
    raise DataError(
        f"{file}: column '{column}' ({config_key}) has type {t}; expected encoded image bytes "
        "(binary, or a struct with a binary 'bytes' field)"
    )


def _cell_bytes(cell: Any) -> bytes | None:
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return cell if cell is None else bytes(cell)


class ParquetImageTextDataset(RawImageTextDataset):
    """Rows of Parquet files with a caption column and an encoded-image column.

    Reading one item reads its row group's image column(s); the last row group read is kept, so an
    in-order pass (as the cache precompute does) reads each row group once.
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__(config)
        self.files = _parquet_files(config.paths)
        self._items: list[tuple[int, int]] = []  # (file number, row)
        self._captions: list[str] = []
        self._group_starts: list[list[int]] = []
        for number, file in enumerate(self.files):
            self._scan(number, file)
        self._handles: dict[int, pq.ParquetFile] = {}
        self._group_cache: tuple[tuple[int, int], pa.Table] | None = None
        self._owner_pid = os.getpid()
        self._check_not_empty(", ".join(map(str, self.files)))

    def _scan(self, number: int, file: Path) -> None:
        cfg = self.config
        handle = _open_parquet(file)
        schema = handle.schema_arrow
        captions = _caption_values(file, handle, cfg.caption_column)
        _check_image_column(file, schema, cfg.image_column, "data.image_column")
        if cfg.ref_image_column is not None:
            _check_image_column(file, schema, cfg.ref_image_column, "data.ref_image_column")
        starts, total = [], 0
        for group in range(handle.num_row_groups):
            starts.append(total)
            total += handle.metadata.row_group(group).num_rows
        self._group_starts.append(starts)
        for row, caption in enumerate(captions):
            if caption is None or not caption.strip():
                self.scan_stats.record(SkipReason.MISSING_CAPTION, f"{file}#{row}")
                continue
            self._items.append((number, row))
            self._captions.append(caption.strip())

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles and the row-group cache stay in the process that made them.
        state = dict(self.__dict__)
        state["_handles"], state["_group_cache"] = {}, None
        return state

    def _row_group(self, number: int, row: int) -> tuple[pa.Table, int]:
        starts = self._group_starts[number]
        group = bisect.bisect_right(starts, row) - 1
        if self._owner_pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._handles, self._group_cache, self._owner_pid = {}, None, os.getpid()
        if self._group_cache is None or self._group_cache[0] != (number, group):
            handle = self._handles.get(number)
            if handle is None:
                handle = self._handles[number] = pq.ParquetFile(self.files[number])
            columns = [self.config.image_column] + ([self.config.ref_image_column] if self.config.ref_image_column else [])
            self._group_cache = ((number, group), handle.read_row_group(group, columns=columns))
        return self._group_cache[1], row - starts[group]

    def __getitem__(self, index: int) -> RawSample | Skipped:
        number, row = self._items[index]
        key = f"{self.files[number]}#{row}"
        table, local = self._row_group(number, row)
        image = _cell_bytes(table.column(self.config.image_column)[local].as_py())
        ref = None
        if self.config.ref_image_column is not None:
            ref = _cell_bytes(table.column(self.config.ref_image_column)[local].as_py())
        return self._decode(index, key, self._captions[index], image, ref)


# ---------------------------------------------------------------------------------------------- folders
class FolderImageTextDataset(RawImageTextDataset):
    """Images with a same-stem caption file beside them (``cat.png`` + ``cat.txt``), searched recursively.

    Edit data: the reference image is ``<stem><ref_suffix>.<ext>`` (e.g. ``cat_ref.png``). Hidden files
    and folders (names starting with ``.``) are ignored; any other file that is neither an image, a
    reference nor a caption is counted as UNSUPPORTED_FILE, and a caption with no image as MISSING_IMAGE.
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__(config)
        self._items: list[tuple[Path, Path | None, str]] = []  # (image, reference, caption)
        for raw in config.paths:
            root = Path(raw)
            if not root.is_dir():
                raise FileNotFoundError(f"data.paths: {root} is not a folder")
            self._scan(root)
        self._check_not_empty(", ".join(config.paths))

    def _scan(self, root: Path) -> None:
        cfg = self.config
        images: dict[Path, Path] = {}  # stem path (no suffix) -> file
        refs: dict[Path, Path] = {}
        captions: dict[Path, Path] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                file = Path(dirpath) / name
                suffix = file.suffix.lower()
                stem = file.with_suffix("")
                if suffix == cfg.caption_extension:
                    captions[stem] = file
                elif suffix in cfg.image_extensions:
                    if cfg.ref_suffix is not None and stem.name.endswith(cfg.ref_suffix):
                        refs[stem.with_name(stem.name[: -len(cfg.ref_suffix)])] = file
                    else:
                        images[stem] = file
                else:
                    self.scan_stats.record(SkipReason.UNSUPPORTED_FILE, str(file))
        for stem, caption_file in captions.items():
            if stem not in images:
                self.scan_stats.record(SkipReason.MISSING_IMAGE, str(caption_file))
        for stem in sorted(images):
            image = images[stem]
            caption = _read_caption(captions.get(stem))
            if caption is None:
                self.scan_stats.record(SkipReason.MISSING_CAPTION, str(image))
                continue
            ref = refs.get(stem)
            if cfg.ref_suffix is not None and ref is None:
                self.scan_stats.record(SkipReason.MISSING_REFERENCE, str(image))
                continue
            self._items.append((image, ref, caption))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> RawSample | Skipped:
        image_file, ref_file, caption = self._items[index]
        key = str(image_file)
        try:
            image = image_file.read_bytes()
        except OSError as e:
            return Skipped(index, key, SkipReason.CORRUPT_IMAGE, f"cannot read: {e}")
        ref = None
        if ref_file is not None:
            try:
                ref = ref_file.read_bytes()
            except OSError as e:
                return Skipped(index, key, SkipReason.CORRUPT_REFERENCE, f"cannot read: {e}")
        return self._decode(index, key, caption, image, ref)


def _read_caption(file: Path | None) -> str | None:
    """The stripped caption, or None if the file is absent, unreadable, not UTF-8 or blank."""
    if file is None:
        return None
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


# ---------------------------------------------------------------------------------------------- prompts
PROMPT_FILE_SUFFIXES = (".txt", ".parquet")


@dataclass
class PromptItem:
    """One prompt of a prompts source (no image)."""

    index: int
    key: str
    caption: str


def _prompt_files(paths: list[str], stats: DataStats) -> list[Path]:
    """The ``.txt`` / ``.parquet`` files ``paths`` name, folders searched recursively (hidden names
    ignored; any other file in a folder is counted as UNSUPPORTED_FILE)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(n for n in filenames if not n.startswith(".")):
                    file = Path(dirpath) / name
                    if file.suffix.lower() in PROMPT_FILE_SUFFIXES:
                        found.append(file)
                    else:
                        stats.record(SkipReason.UNSUPPORTED_FILE, str(file))
            if not found:
                raise DataError(f"data.paths: folder {path} contains no .txt or .parquet file (data.source: prompts)")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in PROMPT_FILE_SUFFIXES:
                raise DataError(f"data.paths: {path} is neither a .txt nor a .parquet file (data.source: prompts)")
            files.append(path)
        else:
            raise FileNotFoundError(f"data.paths: {path} does not exist")
    return files


def _text_lines(file: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark dropped; a final newline ends the last line)."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"data.paths: {file} is not UTF-8 text: {e}") from e
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


class PromptDataset(RawImageTextDataset):
    """Prompts without images (``data.source: prompts``), for image-free training.

    ``.txt`` files hold one prompt per line (key ``<file>:<line>``, 1-based); ``.parquet`` files one per
    row of ``data.caption_column`` (key ``<file>#<row>``). Prompts are stripped; a blank one is counted
    as EMPTY_PROMPT. ``dataset[i]`` is a :class:`PromptItem`; batches are :class:`RawBatch` es without
    pixels (``pixels is None``).
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__(config)
        self._items: list[tuple[str, str]] = []  # (key, prompt)
        for file in _prompt_files(config.paths, self.scan_stats):
            if file.suffix.lower() == ".txt":
                values = [(f"{file}:{n}", line) for n, line in enumerate(_text_lines(file), start=1)]
            else:
                captions = _caption_values(file, _open_parquet(file), config.caption_column)
                values = [(f"{file}#{row}", caption) for row, caption in enumerate(captions)]
            for key, value in values:
                prompt = (value or "").strip()
                if prompt:
                    self._items.append((key, prompt))
                else:
                    self.scan_stats.record(SkipReason.EMPTY_PROMPT, key)
        self._check_not_empty(", ".join(config.paths))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> PromptItem:
        key, prompt = self._items[index]
        return PromptItem(index, key, prompt)

    @staticmethod
    def collate(samples: list[PromptItem]) -> RawBatch:  # type: ignore[override]
        return RawBatch(
            pixels=None,
            captions=[s.caption for s in samples],
            ref_pixels=None,
            indices=[s.index for s in samples],
            keys=[s.key for s in samples],
        )


def build_raw_dataset(config: DataConfig) -> RawImageTextDataset:
    """The raw dataset for ``config.source``."""
    if config.source == "parquet":
        return ParquetImageTextDataset(config)
    if config.source == "folder":
        return FolderImageTextDataset(config)
    if config.source == "prompts":
        return PromptDataset(config)
    raise DataError(f"data.source: unknown source kind {config.source!r}")
