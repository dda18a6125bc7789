"""An embedded, deterministic text-to-image dataset of coloured shapes.

Every image is generated from its index alone (a seeded RNG per item), so the dataset ships as code,
needs no download and is identical on every machine. A prompt names up to four things a GenEval-style
check can verify in a sample: the object (circle, square, triangle), its colour, the count (one or two)
and, for a single object, its position (left, right, top, bottom).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two"}


@dataclass(frozen=True)
class Prompt:
    """What an image shows; ``position`` is None for two objects."""

    shape: str
    color: str
    count: int
    position: Optional[str] = None

    @property
    def text(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        words = f"{COUNT_WORDS[self.count]} {self.color} {noun}"
        return words + (f" on the {self.position}" if self.position else "")


def all_prompts() -> list[Prompt]:
    """Every prompt the dataset can produce, in a fixed order (60 prompts)."""
    out = []
    for shape in SHAPES:
        for color in COLORS:
            for position in POSITIONS:
                out.append(Prompt(shape, color, 1, position))
            out.append(Prompt(shape, color, 2))
    return out


def _region(position: Optional[str], size: int, margin: int) -> tuple[int, int, int, int]:
    """Box (x0, x1, y0, y1) where a centre may fall for the position."""
    lo, hi, mid = margin, size - margin, size // 2
    return {
        "left": (lo, mid - margin // 2, lo + 2, hi - 2),
        "right": (mid + margin // 2, hi, lo + 2, hi - 2),
        "top": (lo + 2, hi - 2, lo, mid - margin // 2),
        "bottom": (lo + 2, hi - 2, mid + margin // 2, hi),
        None: (lo, hi, lo, hi),
    }[position]


def draw_shape(canvas: np.ndarray, shape: str, color: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    """Rasterise one filled shape of radius ``r`` centred at (cx, cy) into an (H, W, 3) uint8 canvas."""
    h, w, _ = canvas.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif shape == "square":
        side = r * 0.886  # same area as the circle
        mask = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    elif shape == "triangle":
        top, base = cy - 1.2 * r, cy + 0.8 * r
        half = (ys - top) / (base - top) * 1.15 * r
        mask = (ys >= top) & (ys <= base) & (np.abs(dx) <= half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    canvas[mask] = color


def render(prompt: Prompt, size: int, seed: int) -> np.ndarray:
    """The image (H, W, 3) uint8 for a prompt; jitter in size and place comes from ``seed``."""
    rng = random.Random(seed)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    r = size * rng.uniform(0.13, 0.17)
    margin = int(r) + 1
    if prompt.count == 1:
        x0, x1, y0, y1 = _region(prompt.position, size, margin)
        draw_shape(canvas, prompt.shape, COLORS[prompt.color], rng.uniform(x0, x1), rng.uniform(y0, y1), r)
    else:
        # two objects, one in each half along a random axis so they never touch
        r *= 0.85
        horizontal = rng.random() < 0.5
        halves = ("left", "right") if horizontal else ("top", "bottom")
        for half in halves:
            x0, x1, y0, y1 = _region(half, size, int(r) + 1)
            draw_shape(canvas, prompt.shape, COLORS[prompt.color], rng.uniform(x0, x1), rng.uniform(y0, y1), r)
    return canvas


class ShapesDataset:
    """``length`` items cycling through every prompt; item i is rendered with seed ``seed * 1_000_003 + i``."""

    def __init__(self, length: int = 4096, size: int = 32, seed: int = 0):
        self.prompts = all_prompts()
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def prompt(self, index: int) -> Prompt:
        return self.prompts[index % len(self.prompts)]

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        p = self.prompt(index)
        return render(p, self.size, self.seed * 1_000_003 + index), p.text
