"""Image decoding and preparation: bytes -> RGB -> shorter side resized, center crop -> [-1, 1] tensor.

Images are only ever decoded by PIL from raw bytes: nothing read from a dataset is unpickled.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .stats import SkipReason


class ImageDecodeError(ValueError):
    """Bytes that do not give an image; ``reason`` is NOT_AN_IMAGE or CORRUPT_IMAGE."""

    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an upright RGB image, fully loaded.

    ``max_pixels`` (``data.max_image_pixels``): an image whose header declares more pixels is refused
    before any pixel is decoded (a decompression bomb: a small file that decodes to gigabytes).

    Raises :class:`ImageDecodeError`: NOT_AN_IMAGE when PIL recognises no format, IMAGE_TOO_LARGE over
    the limit (or over PIL's own bomb limit), CORRUPT_IMAGE when a recognised file fails to decode.
    """
    with warnings.catch_warnings():
        # Opening reads only the header. PIL warns (DecompressionBombWarning) from the declared size
        # and raises DecompressionBombError over twice its own limit; ``max_pixels`` decides below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise ImageDecodeError(SkipReason.NOT_AN_IMAGE, "not a recognised image format") from e
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(SkipReason.IMAGE_TOO_LARGE, f"refused before decoding: {e}") from e
        except (OSError, ValueError) as e:
            raise ImageDecodeError(SkipReason.CORRUPT_IMAGE, f"cannot open: {e}") from e
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                SkipReason.IMAGE_TOO_LARGE,
                f"{width}x{height} = {width * height} pixels is over data.max_image_pixels={max_pixels}; refused before decoding",
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
        # PIL's decoders report broken data with several exception types (OSError for truncation,
        # SyntaxError / struct errors from format parsers, ...); any of them means this one file is unusable.
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(SkipReason.CORRUPT_IMAGE, f"cannot decode: {type(e).__name__}: {e}") from e


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then crop the central ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image_tensor(data: bytes, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded bytes -> (3, size, size) in [-1, 1]; raises :class:`ImageDecodeError` (see :func:`decode_image`)."""
    return image_to_tensor(resize_center_crop(decode_image(data, max_pixels), size))
