"""Helpers for the data tests: small encoded images and Parquet files (imported by the test modules)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CAPTIONS = [
    "a red cat on a mat",
    "a white dog running on the beach",
    "mountains under a cloudy sky",
    "a small wooden house",
    "two children playing with shells",
    "a green plant in the morning light",
    "an old door painted yellow",
]


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A random RGB image (width, height) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def truncated_png(seed: int) -> bytes:
    """A PNG whose header is intact but whose pixel data is cut off (opens, fails to decode)."""
    data = image_bytes(seed)
    return data[: len(data) // 2]


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3, image_type: pa.DataType = pa.binary()) -> Path:
    """Rows of {caption, image[, ref]} as a Parquet file with small row groups."""
    columns = {name: [r.get(name) for r in rows] for name in rows[0]}
    schema = pa.schema([(name, pa.string() if name == "caption" else image_type) for name in columns])
    table = pa.table(columns, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
