"""The latent codec: how a run's latents map to pixels and back.

A run's latents come from one of two codecs, named by a string that the cache's fingerprint records
(``latent_codec``) and that an export copies, so a model can be sampled with the codec it was trained
in and nothing else:

* ``"vae"`` (the default, and what a fingerprint without the key means): the VAE of the encoder folder
  the cache was built with (``model_path``).
* ``"pixel_unshuffle_<F>"``: an exact, parameter-free fold of the RGB image into ``3·F²`` channels of
  ``H/F × W/F`` (the demo's, which trains in pixel space because a VAE would first have to be trained).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as Fn

VAE = "vae"
_FOLD = re.compile(r"^pixel_unshuffle_([1-9][0-9]*)$")


def pixel_fold_name(factor: int) -> str:
    return f"pixel_unshuffle_{factor}"


@dataclass(frozen=True)
class LatentCodec:
    """``name`` as recorded; ``fold`` is the pixel-fold factor, or None for the VAE."""

    name: str
    fold: Optional[int] = None

    @classmethod
    def parse(cls, name: Optional[str]) -> "LatentCodec":
        if name is None or name == VAE:
            return cls(VAE)
        match = _FOLD.match(str(name))
        if match is None:
            raise ValueError(f"unknown latent codec {name!r}: expected {VAE!r} or 'pixel_unshuffle_<factor>'")
        return cls(str(name), int(match.group(1)))

    @classmethod
    def from_fingerprint(cls, fingerprint: dict[str, Any]) -> "LatentCodec":
        return cls.parse(fingerprint.get("latent_codec"))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (pixel folds only; the VAE encodes in the conditioner)."""
        self._require_fold()
        return Fn.pixel_unshuffle(pixels, self.fold)

    def latent_shape(self, height: int, width: int, conditioner: Any = None) -> tuple[int, int, int]:
        """(C, h, w) of one latent of a ``height × width`` image."""
        if self.fold is None:
            factor = conditioner.vae_scale_factor
            return conditioner.latent_channels, height // factor, width // factor
        return 3 * self.fold**2, height // self.fold, width // self.fold

    def size_multiple(self, conditioner: Any = None) -> int:
        """Image sides must be multiples of this (the latent is later patchified 2×2)."""
        return 2 * (conditioner.vae_scale_factor if self.fold is None else self.fold)

    def decoder(self, conditioner: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Latents -> (B, 3, H, W) pixels in [-1, 1]."""
        if self.fold is None:
            return conditioner.latents_to_pixels
        fold = self.fold
        return lambda latents: Fn.pixel_shuffle(latents, fold)

    def _require_fold(self) -> None:
        if self.fold is None:
            raise ValueError("the VAE codec encodes through the backbone's conditioner (pixels_to_latents)")
