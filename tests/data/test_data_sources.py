"""Raw sources: Parquet rows and image folders, bad items skipped and counted by reason."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from twinflow.data import (
    DataConfig,
    DataError,
    FolderImageTextDataset,
    ParquetImageTextDataset,
    RawSample,
    ResumableLoader,
    Skipped,
    SkipReason,
    iter_batches_in_order,
)
from twinflow.data.images import load_image_tensor, resize_center_crop
from twinflow.utils.typed_config import ConfigError, from_dict

from data_helpers import CAPTIONS, image_bytes, truncated_png, write_parquet


class _TouchOnUnpickle:
    """Unpickling this creates a file: proves whether any data path unpickles bytes."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _parquet_config(path: Path, **kw) -> DataConfig:
    return DataConfig(source="parquet", paths=[str(path)], image_size=32, **kw)


def test_resize_center_crop_keeps_the_middle() -> None:
    # 90x30, white in columns 20..70 and black at the sides: scaled to 48x16, the central 16 columns
    # (originally 30..60) are all white; an off-centre crop would take black pixels.
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, 20:70] = 255
    out = resize_center_crop(Image.fromarray(arr), 16)
    assert out.size == (16, 16)
    assert np.asarray(out).min() >= 250
    tall = resize_center_crop(Image.fromarray(arr.transpose(1, 0, 2).copy()), 16)
    assert tall.size == (16, 16) and np.asarray(tall).min() >= 250
    # Already the right size: no resampling, so the values are exactly u8 / 127.5 - 1, channels first.
    data = image_bytes(0, size=(32, 32))
    expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    tensor = load_image_tensor(data, 32)
    assert tensor.dtype == torch.float32 and torch.equal(tensor, expected)
    assert load_image_tensor(image_bytes(0, size=(50, 70)), 32).shape == (3, 32, 32)


def test_parquet_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    rows = [{"caption": c, "image": image_bytes(i)} for i, c in enumerate(CAPTIONS[:4])]
    rows += [
        {"caption": "truncated png", "image": truncated_png(10)},
        {"caption": "plain text bytes", "image": b"this is not an image"},
        {"caption": "pickled object", "image": pickle.dumps(_TouchOnUnpickle(marker))},
        {"caption": None, "image": image_bytes(11)},
        {"caption": "   ", "image": image_bytes(12)},
        {"caption": "null image", "image": None},
    ]
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    dataset = ParquetImageTextDataset(_parquet_config(path))
    assert len(dataset) == 8  # the two caption-less rows never enter the index
    assert dataset.scan_stats.count(SkipReason.MISSING_CAPTION) == 2

    loader = ResumableLoader(dataset, batch_size=2, seed=3)
    stream = iter(loader)
    seen = []
    for _ in range(4):  # two epochs: 4 usable items per epoch
        batch = next(stream)
        assert batch.pixels.shape == (2, 3, 32, 32)
        seen += batch.captions
    assert sorted(set(seen)) == sorted(CAPTIONS[:4])
    assert loader.stats.as_dict() == {
        "missing_caption": 2,
        "missing_image": 1,
        "not_an_image": 2,
        "corrupt_image": 1,
        "image_too_large": 0,
        "unsupported_file": 0,
        "missing_reference": 0,
        "corrupt_reference": 0,
        "empty_prompt": 0,
    }
    assert not marker.exists(), "image bytes must never be unpickled"
    assert any("#4" in key for key in loader.stats.examples(SkipReason.CORRUPT_IMAGE))


def test_parquet_image_struct_column_and_row_groups(tmp_path: Path) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"caption": c, "image": {"bytes": image_bytes(i), "path": f"{i}.png"}} for i, c in enumerate(CAPTIONS)]
    path = write_parquet(tmp_path / "hf.parquet", rows, row_group_size=2, image_type=struct)
    dataset = ParquetImageTextDataset(_parquet_config(path))
    reference = [load_image_tensor(image_bytes(i), 32) for i in range(len(CAPTIONS))]
    for index in (6, 0, 3, 4, 1):  # out of order: crosses row groups both ways
        sample = dataset[index]
        assert isinstance(sample, RawSample)
        assert sample.caption == CAPTIONS[index]
        assert torch.equal(sample.pixels, reference[index])


def test_parquet_folder_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards" / "nested"
    shards.mkdir(parents=True)
    write_parquet(shards / "part-1.parquet", [{"caption": c, "image": image_bytes(i)} for i, c in enumerate(CAPTIONS[3:5])])
    write_parquet(shards.parent / "part-0.parquet", [{"caption": c, "image": image_bytes(i)} for i, c in enumerate(CAPTIONS[:3])])
    dataset = ParquetImageTextDataset(_parquet_config(tmp_path / "shards"))
    assert len(dataset) == 5
    samples = [dataset[i] for i in range(5)]
    # Files are taken in sorted path order: shards/nested/part-1 before shards/part-0.
    assert [s.caption for s in samples] == CAPTIONS[3:5] + CAPTIONS[:3]
    assert samples[0].key.endswith("nested/part-1.parquet#0") and samples[4].key.endswith("shards/part-0.parquet#2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty contains no .parquet file"):
        ParquetImageTextDataset(_parquet_config(tmp_path / "empty"))


def test_parquet_schema_errors_name_the_column_and_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "x.parquet", [{"caption": "a", "image": image_bytes(0)}])
    with pytest.raises(DataError, match=r"x\.parquet.*'jpg'.*data\.image_column"):
        ParquetImageTextDataset(_parquet_config(path, image_column="jpg"))
    with pytest.raises(DataError, match=r"'text'.*data\.caption_column"):
        ParquetImageTextDataset(_parquet_config(path, caption_column="text"))
    with pytest.raises(DataError, match=r"'caption'.*data\.image_column.*type string"):
        ParquetImageTextDataset(_parquet_config(path, image_column="caption"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet is not a readable Parquet file"):
        ParquetImageTextDataset(_parquet_config(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        ParquetImageTextDataset(_parquet_config(tmp_path / "missing.parquet"))


def test_all_bad_data_raises_instead_of_hanging(tmp_path: Path) -> None:
    rows = [{"caption": f"bad {i}", "image": b"\x89PNG garbage"} for i in range(5)]
    dataset = ParquetImageTextDataset(_parquet_config(write_parquet(tmp_path / "bad.parquet", rows)))
    with pytest.raises(DataError, match="no usable item in a whole epoch.*not_an_image: 5"):
        next(iter(ResumableLoader(dataset, batch_size=2)))
    with pytest.raises(DataError, match="no usable item among 5"):
        list(iter_batches_in_order(dataset, 2, ResumableLoader(dataset, 1).stats))
    no_captions = write_parquet(tmp_path / "nocap.parquet", [{"caption": None, "image": image_bytes(0)}])
    with pytest.raises(DataError, match="no usable item.*missing_caption: 1"):
        ParquetImageTextDataset(_parquet_config(no_captions))


def _write_folder(root: Path) -> None:
    root.mkdir()
    (root / "sub").mkdir()
    for i, name in enumerate(["a", "b", "sub/c"]):
        (root / f"{name}.png").write_bytes(image_bytes(i))
        (root / f"{name}.txt").write_text(f"  {CAPTIONS[i]}\n")
    (root / "d.jpg").write_bytes(image_bytes(3, fmt="JPEG"))
    (root / "d.txt").write_text(CAPTIONS[3])
    (root / "no_caption.png").write_bytes(image_bytes(4))
    (root / "blank.png").write_bytes(image_bytes(5))
    (root / "blank.txt").write_text("  \n")
    (root / "fake.png").write_text("I am a text file with an image extension")
    (root / "fake.txt").write_text("fake image")
    (root / "broken.png").write_bytes(truncated_png(6))
    (root / "broken.txt").write_text("broken image")
    (root / "notes.json").write_text("{}")
    (root / "orphan.txt").write_text("a caption without an image")
    (root / ".DS_Store").write_bytes(b"\0\0")


def test_folder_dataset_counts_each_reason(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write_folder(root)
    config = DataConfig(source="folder", paths=[str(root)], image_size=32)
    dataset = FolderImageTextDataset(config)
    assert len(dataset) == 6  # a, b, sub/c, d, fake, broken
    items = [dataset[i] for i in range(len(dataset))]
    usable = {s.caption for s in items if isinstance(s, RawSample)}
    assert usable == set(CAPTIONS[:4])  # captions are stripped
    skipped = {Path(s.key).name: s.reason for s in items if isinstance(s, Skipped)}
    assert skipped == {"fake.png": SkipReason.NOT_AN_IMAGE, "broken.png": SkipReason.CORRUPT_IMAGE}

    loader = ResumableLoader(dataset, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.ref_pixels is None
    counts = loader.stats.as_dict()
    assert counts["missing_caption"] == 2  # no_caption.png, blank.png
    assert counts["not_an_image"] == 1 and counts["corrupt_image"] == 1
    assert counts["unsupported_file"] == 1  # notes.json (hidden files are ignored)
    assert counts["missing_image"] == 1  # orphan.txt
    assert "orphan.txt" in loader.stats.summary()


def test_reference_images_for_edit(tmp_path: Path) -> None:
    root = tmp_path / "edit"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(i))
        (root / f"{i}.txt").write_text(CAPTIONS[i])
    (root / "0_ref.png").write_bytes(image_bytes(100))
    (root / "1_ref.jpg").write_bytes(truncated_png(101))
    folder = FolderImageTextDataset(DataConfig(source="folder", paths=[str(root)], image_size=32, ref_suffix="_ref"))
    assert folder.scan_stats.count(SkipReason.MISSING_REFERENCE) == 1  # 2.png has no reference
    first, second = folder[0], folder[1]
    assert isinstance(first, RawSample) and torch.equal(first.ref_pixels, load_image_tensor(image_bytes(100), 32))
    assert isinstance(second, Skipped) and second.reason is SkipReason.CORRUPT_REFERENCE

    rows = [
        {"caption": "edit me", "image": image_bytes(0), "ref": image_bytes(1)},
        {"caption": "no ref", "image": image_bytes(2), "ref": None},
    ]
    path = write_parquet(tmp_path / "edit.parquet", rows)
    parquet = ParquetImageTextDataset(_parquet_config(path, ref_image_column="ref"))
    good, missing = parquet[0], parquet[1]
    assert isinstance(good, RawSample) and torch.equal(good.ref_pixels, load_image_tensor(image_bytes(1), 32))
    assert isinstance(missing, Skipped) and missing.reason is SkipReason.MISSING_REFERENCE
    assert ParquetImageTextDataset.collate([good]).ref_pixels.shape == (1, 3, 32, 32)


def test_data_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="image_size must be a positive multiple of 16"):
        from_dict(DataConfig, {"source": "folder", "paths": ["x"], "image_size": 40})
    with pytest.raises(ConfigError, match="unknown config key.*'data.captions'"):
        from_dict(DataConfig, {"source": "folder", "paths": ["x"], "captions": "c"}, prefix="data.")
    with pytest.raises(ConfigError, match="use_cache is true but cache_dir is not set"):
        from_dict(DataConfig, {"source": "parquet", "paths": ["x"], "use_cache": True})
    with pytest.raises(ConfigError, match="ref_suffix is for folder sources"):
        from_dict(DataConfig, {"source": "parquet", "paths": ["x"], "ref_suffix": "_ref"})


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels but whose data holds one row: a
    decoder that trusted it would allocate the whole image and then fail on the missing rows."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_before_decoding_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(2):
        (root / f"ok{i}.png").write_bytes(image_bytes(i))
        (root / f"ok{i}.txt").write_text(CAPTIONS[i])
    # 10000 x 10000 = 100 MP: over the default limit (PIL only warns below 2x its own), and 400 MP:
    # over PIL's hard limit. Neither has the pixel data its header declares, so decoding would fail:
    # being counted as too large (not corrupt) shows the size was refused before any decoding.
    (root / "bomb.png").write_bytes(_png_header_only(10_000, 10_000))
    (root / "bomb.txt").write_text("a bomb")
    (root / "huge.png").write_bytes(_png_header_only(20_000, 20_000))
    (root / "huge.txt").write_text("a bigger bomb")
    config = from_dict(DataConfig, {"source": "folder", "paths": [str(root)], "image_size": 32})
    assert config.max_image_pixels == 89_478_485  # the documented default
    dataset = FolderImageTextDataset(config)
    loader = ResumableLoader(dataset, batch_size=2, shuffle=False)
    assert next(iter(loader)).pixels.shape == (2, 3, 32, 32)
    assert loader.stats.count(SkipReason.IMAGE_TOO_LARGE) == 2 and loader.stats.count(SkipReason.CORRUPT_IMAGE) == 0
    assert "image_too_large: 2" in loader.stats.summary()

    # The limit is configurable: a 48 x 40 image is refused under data.max_image_pixels=1000.
    small = from_dict(DataConfig, {"source": "folder", "paths": [str(root)], "image_size": 32, "max_image_pixels": 1000})
    dataset = FolderImageTextDataset(small)
    skipped = next(item for item in map(dataset.__getitem__, range(len(dataset))) if item.key.endswith("ok0.png"))
    assert isinstance(skipped, Skipped) and skipped.reason is SkipReason.IMAGE_TOO_LARGE
    assert "1920 pixels is over data.max_image_pixels=1000" in skipped.detail
    with pytest.raises(ConfigError, match="max_image_pixels must be >= 1"):
        from_dict(DataConfig, {"source": "folder", "paths": ["x"], "max_image_pixels": 0})
