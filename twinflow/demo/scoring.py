"""A GenEval-style automatic score for the shapes dataset.

GenEval asks of each sample whether it shows what the prompt asked: the object, its colour, the count
and the position. Our images are simple enough for a classical detector: pixels are assigned to the
nearest palette colour (or background), connected components above a minimum area are objects, the
ratio of an object's area to its bounding box tells the shape (square ~1.0, circle ~0.79, triangle
~0.5), and the centroid gives the position. A prompt is satisfied when exactly the requested number of
objects is found, all of the requested colour and shape, and (for one object) in the requested half.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import COLORS, Prompt


@dataclass
class Detection:
    color: str
    shape: str
    cx: float
    cy: float
    area: int


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def classify_shape(pixels: np.ndarray) -> str:
    ys, xs = pixels[:, 0], pixels[:, 1]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(pixels) / box
    if fill > 0.9:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle"


def detect(image: np.ndarray, min_area_frac: float = 0.012) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image."""
    h, w, _ = image.shape
    palette = np.array([(0, 0, 0)] + list(COLORS.values()), dtype=np.float32)
    names = [None] + list(COLORS)
    dist = ((image[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    out = []
    for k in range(1, len(names)):
        for pixels in _components(label == k):
            if len(pixels) < min_area_frac * h * w:
                continue
            out.append(
                Detection(names[k], classify_shape(pixels), pixels[:, 1].mean() + 0.5, pixels[:, 0].mean() + 0.5, len(pixels))
            )
    return out


def _position_ok(d: Detection, position: str, size: int) -> bool:
    mid = size / 2
    return {"left": d.cx < mid, "right": d.cx > mid, "top": d.cy < mid, "bottom": d.cy > mid}[position]


def score_image(image: np.ndarray, prompt: Prompt) -> dict[str, bool]:
    """Per-criterion pass/fail of one sample; ``overall`` needs all of them."""
    found = detect(image)
    right_color = [d for d in found if d.color == prompt.color]
    result = {
        "count": len(found) == prompt.count,
        "color": len(found) > 0 and all(d.color == prompt.color for d in found),
        "object": len(right_color) > 0 and all(d.shape == prompt.shape for d in right_color),
    }
    if prompt.position is not None:
        result["position"] = len(found) == 1 and _position_ok(found[0], prompt.position, image.shape[0])
    result["overall"] = all(result.values())
    return result


CRITERIA = ("object", "color", "count", "position")


def score_batch(images: list[np.ndarray], prompts: list[Prompt]) -> dict[str, float]:
    """Pass rate of each criterion over a batch (position only over prompts that ask for one),
    ``overall`` (every criterion of a sample right) and ``score``: the mean of the criterion rates, as
    GenEval averages its task categories."""
    totals: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        for key, ok in score_image(image, prompt).items():
            totals.setdefault(key, []).append(ok)
    out = {key: float(np.mean(v)) for key, v in totals.items()}
    out["score"] = float(np.mean([out[c] for c in CRITERIA if c in out]))
    return out
