"""Fixtures for the data tests: a Parquet file of good rows and the tiny encoders (built once)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from data_helpers import CAPTIONS, image_bytes, write_parquet


@pytest.fixture
def good_parquet(tmp_path: Path) -> Path:
    """Seven usable rows spread over three row groups."""
    rows = [{"caption": c, "image": image_bytes(i, size=(40 + 8 * (i % 3), 36))} for i, c in enumerate(CAPTIONS)]
    return write_parquet(tmp_path / "good.parquet", rows)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from twinflow.backbones.qwen_image.tiny_encoders import save_tiny_model_folder

    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny_qwen_image"))


@pytest.fixture(scope="session")
def make_conditioner(tiny_model_dir: Path) -> Callable:
    """Conditioners loaded from the tiny folder in float32, one per variant (loaded once)."""
    import torch

    from twinflow.backbones.qwen_image.encoders import QwenImageConditioner

    loaded: dict[str, QwenImageConditioner] = {}

    def get(variant: str = "t2i") -> QwenImageConditioner:
        if variant not in loaded:
            loaded[variant] = QwenImageConditioner.from_pretrained(
                tiny_model_dir, variant=variant, text_encoder_dtype=torch.float32, vae_dtype=torch.float32
            )
        return loaded[variant]

    return get
