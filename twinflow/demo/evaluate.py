"""Sampling, scoring and pictures for the demo: every prompt at 1, 2, 4 and 30 NFE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from twinflow.backbones.qwen_image.condition import QwenCondition
from twinflow.sampling.config import SamplerConfig
from twinflow.sampling.sampler import sample

from .scoring import score_batch
from .shapes import Prompt

# (label, sampler preset): the four settings the demo reports, per ALGORITHM.md §4's reference settings.
SETTINGS: list[tuple[str, str]] = [
    ("1nfe", "one_step"),
    ("2nfe", "few_step"),
    ("4nfe_any", "any_step"),
    ("30nfe_multi", "multi_step"),
]

Backbone = Callable[..., torch.Tensor]


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@dataclass
class SettingResult:
    label: str
    nfe: int
    scores: dict[str, float]
    images: list[np.ndarray]


@torch.no_grad()
def sample_setting(
    model: Backbone,
    cond: QwenCondition,
    latent_shape: tuple[int, int, int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    preset: str,
    seed: int,
    batch_size: int = 64,
) -> tuple[list[np.ndarray], int]:
    """Samples for every row of ``cond`` (fixed noise per row and seed), and the NFE used."""
    config = SamplerConfig.preset(preset)
    images, nfe = [], 0
    n = len(cond)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *latent_shape, generator=gen)
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        result = sample(
            model, noise[rows], cond.index(rows), config=config,
            generator=torch.Generator().manual_seed(seed + start), keep_intermediates=False,
        )
        nfe = result.nfe
        images.extend(to_uint8(decode(result.sample.float())))
    return images, nfe


def evaluate(
    model: Backbone,
    prompts: list[Prompt],
    cond: QwenCondition,
    latent_shape: tuple[int, int, int],
    decode: Callable[[torch.Tensor], torch.Tensor],
    samples_per_prompt: int = 4,
    seed: int = 0,
    desc: str = "sampling",
) -> list[SettingResult]:
    """Score ``samples_per_prompt`` samples of every prompt at every setting."""
    rows = QwenCondition.cat([cond] * samples_per_prompt)
    row_prompts = prompts * samples_per_prompt
    out = []
    for label, preset in tqdm(SETTINGS, desc=desc):
        images, nfe = sample_setting(model, rows, latent_shape, decode, preset, seed)
        out.append(SettingResult(label, nfe, score_batch(images, row_prompts), images))
    return out


def save_grid(path: Path, images: list[np.ndarray], prompts: list[Prompt], per_row: int, title: str, scale: int = 3) -> None:
    """One row per prompt (``per_row`` samples each), the prompt written to the left of its row."""
    n_rows = len(images) // per_row
    h, w, _ = images[0].shape
    cell_h, cell_w, caption_w, title_h = h * scale, w * scale, 230, 24
    canvas = Image.new("RGB", (caption_w + per_row * (cell_w + 2), title_h + n_rows * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill="black")
    for r in range(n_rows):
        y = title_h + r * (cell_h + 2)
        draw.text((6, y + cell_h // 2 - 6), prompts[r].text, fill="black")
        for c in range(per_row):
            tile = Image.fromarray(images[r * per_row + c]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (caption_w + c * (cell_w + 2), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def grid_images(images: list[np.ndarray], n_prompts: int, samples_per_prompt: int, show: int) -> list[np.ndarray]:
    """Reorder prompt-major for a grid: the first ``show`` prompts, all their samples in a row."""
    return [images[s * n_prompts + p] for p in range(show) for s in range(samples_per_prompt)]


def comparison_rows(n_prompts: int, rows: int = 12) -> list[int]:
    """``rows`` prompt indices spread evenly over the prompt list (every shape, colour and layout kind)."""
    rows = min(rows, n_prompts)
    return [round(i * (n_prompts - 1) / max(rows - 1, 1)) for i in range(rows)]


def save_comparison(path: Path, columns: list[tuple[str, list[np.ndarray]]], prompts: list[Prompt], rows: list[int],
                    scale: int = 3) -> None:
    """One compact figure: a row per prompt in ``rows`` (its first sample), a column per
    ``(header, images)``; ``images`` are a setting's samples in prompt order (sample 0 first), and the
    header carries the setting's name and score."""
    h, w, _ = columns[0][1][0].shape
    cell_h, cell_w, caption_w, header_h, gap = h * scale, w * scale, 190, 34, 4
    canvas = Image.new("RGB", (caption_w + len(columns) * (cell_w + gap), header_h + len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (header, _) in enumerate(columns):
        draw.multiline_text((caption_w + c * (cell_w + gap), 2), header, fill="black", spacing=2)
    for r, p in enumerate(rows):
        y = header_h + r * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 6), prompts[p].text, fill="black")
        for c, (_, images) in enumerate(columns):
            tile = Image.fromarray(images[p]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (caption_w + c * (cell_w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
