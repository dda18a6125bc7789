"""The ``data`` section of a training / precompute config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["parquet", "folder", "prompts"]
CacheDType = Literal["float32", "bfloat16", "float16"]

IMAGE_MULTIPLE = 16
"""Qwen-Image needs pixel sizes divisible by 16: 8x VAE compression, then 2x2 latent patches."""


@dataclass
class DataConfig:
    """Where the image-caption data is and how items are prepared.

    ``source``: ``parquet`` (``paths`` are ``.parquet`` files or folders of them; columns named by
    ``caption_column`` / ``image_column`` (default ``image``) hold text and encoded image bytes, either a
    binary column or a Hugging Face ``Image`` struct with a ``bytes`` field), ``folder`` (``paths`` are
    folders searched recursively for images with a same-stem ``caption_extension`` file beside them) or
    ``prompts`` (prompts without images, for image-free training, ``method.use_image_free``: ``paths``
    are ``.txt`` files, one prompt per line, ``.parquet`` files whose ``caption_column`` holds the
    prompts, or folders searched recursively for both; blank prompts are skipped and counted as
    ``empty_prompt``). A prompts source takes no image keys (``image_column``, ``ref_image_column``,
    ``ref_suffix``); ``image_size`` still sets the size of the images the model learns to generate, so
    the shape of the cache's placeholder latents (see ``twinflow.data.cache``).

    Edit data: a reference image per item, from ``ref_image_column`` (parquet) or, for folders, the file
    ``<stem><ref_suffix>.<image extension>`` beside the target image.

    Images are resized so the shorter side is ``image_size`` and center-cropped to a square. An image
    with more than ``max_image_pixels`` pixels (width x height as its header declares; default
    89,478,485, PIL's own warning threshold, about 9459 x 9459) is refused before it is decoded and
    counted as ``image_too_large``: a small compressed file can otherwise decode to gigabytes. PIL
    itself refuses images over twice its threshold (about 179 MP) whatever this limit says.
    Training reads the latent/text cache in ``cache_dir`` when ``use_cache`` is true
    (``python -m twinflow.data.precompute`` builds it); ``cache_dtype`` is its storage precision.
    ``seed`` and ``shuffle`` define the sampling order; ``num_workers`` DataLoader worker processes
    decode images.
    """

    source: SourceKind
    paths: list[str]
    image_size: int = 512
    caption_column: str = "caption"
    image_column: str | None = None
    ref_image_column: str | None = None
    ref_suffix: str | None = None
    image_extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp"])
    caption_extension: str = ".txt"
    cache_dir: str | None = None
    use_cache: bool = False
    cache_dtype: CacheDType = "float32"
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    max_image_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths must name at least one file or folder")
        if self.image_size <= 0 or self.image_size % IMAGE_MULTIPLE:
            raise ValueError(f"image_size must be a positive multiple of {IMAGE_MULTIPLE}, got {self.image_size}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.use_cache and not self.cache_dir:
            raise ValueError("use_cache is true but cache_dir is not set")
        if self.source == "prompts":
            image_keys = [k for k in ("image_column", "ref_image_column", "ref_suffix") if getattr(self, k) is not None]
            if image_keys:
                raise ValueError(
                    f"{', '.join('data.' + k for k in image_keys)} set, but data.source: prompts has no images; "
                    "unset them (or use source parquet / folder for image data)"
                )
        elif self.image_column is None:
            self.image_column = "image"
        if self.source == "parquet" and self.ref_suffix is not None:
            raise ValueError("ref_suffix is for folder sources; parquet uses ref_image_column")
        if self.source == "folder" and self.ref_image_column is not None:
            raise ValueError("ref_image_column is for parquet sources; folders use ref_suffix")
        if self.ref_suffix == "":
            raise ValueError("ref_suffix must not be empty")
        self.image_extensions = [e.lower() if e.startswith(".") else "." + e.lower() for e in self.image_extensions]

    @property
    def has_reference(self) -> bool:
        """Whether items carry a reference image (edit training)."""
        return self.ref_image_column is not None or self.ref_suffix is not None

    @property
    def prompts_only(self) -> bool:
        """Whether the items are prompts without images (``source: prompts``)."""
        return self.source == "prompts"
