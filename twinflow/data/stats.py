"""Counting the items a dataset cannot use, instead of crashing on them.

Real image-caption collections contain truncated downloads, files that are not images and rows without
captions. Each such item is skipped and counted under a :class:`SkipReason`, so the trainer can log how
much data it is actually training on and a user can find the bad files (a few example keys are kept per
reason). An item is counted once, however often the sampler draws it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SkipReason(str, Enum):
    """Why an item was not used."""

    MISSING_CAPTION = "missing_caption"  # no caption file / null or blank caption value
    MISSING_IMAGE = "missing_image"  # null image bytes / a caption file with no image beside it
    NOT_AN_IMAGE = "not_an_image"  # bytes or file in no image format PIL recognises
    CORRUPT_IMAGE = "corrupt_image"  # a recognised image format that fails to decode
    IMAGE_TOO_LARGE = "image_too_large"  # more pixels than data.max_image_pixels (refused before decoding)
    UNSUPPORTED_FILE = "unsupported_file"  # folder source: neither an image nor a caption file
    MISSING_REFERENCE = "missing_reference"  # edit data without its reference image
    CORRUPT_REFERENCE = "corrupt_reference"  # reference image that fails to decode
    EMPTY_PROMPT = "empty_prompt"  # prompts source: a blank line of a .txt file / a null or blank cell


class DataError(RuntimeError):
    """The data cannot be used at all (no usable item, unreadable cache, mismatched cache...)."""


@dataclass(frozen=True)
class Skipped:
    """A dataset's answer for an item it cannot use (returned, not raised, so DataLoader workers can pass
    it back to the process that keeps the statistics)."""

    index: int
    key: str
    reason: SkipReason
    detail: str = ""


class DataStats:
    """Skipped items by reason: counts, and up to ``max_examples`` example keys per reason."""

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self._records: dict[tuple[SkipReason, str], str] = {}
        self._carried: dict[SkipReason, int] = {}

    def carry(self, counts: dict[str, int]) -> None:
        """Add counts made elsewhere, by reason name (e.g. a cache manifest's ``skipped``: what its
        precompute skipped), so a run on that cache reports them. Unknown reasons are ignored."""
        known = {reason.value: reason for reason in SkipReason}
        for name, n in counts.items():
            if name in known and n:
                self._carried[known[name]] = self._carried.get(known[name], 0) + int(n)

    def record(self, reason: SkipReason, key: str, detail: str = "") -> None:
        """Count ``key`` under ``reason`` unless it was already counted."""
        self._records.setdefault((reason, key), detail)

    def record_skipped(self, item: Skipped) -> None:
        self.record(item.reason, item.key, item.detail)

    def update(self, other: "DataStats") -> None:
        """Add another statistics object (e.g. the index scan's) into this one."""
        for (reason, key), detail in other._records.items():
            self.record(reason, key, detail)

    @property
    def total(self) -> int:
        return len(self._records) + sum(self._carried.values())

    def count(self, reason: SkipReason) -> int:
        return sum(1 for r, _ in self._records if r is reason) + self._carried.get(reason, 0)

    def as_dict(self) -> dict[str, int]:
        """Counts per reason (every reason present, zeros included), for logging."""
        return {reason.value: self.count(reason) for reason in SkipReason}

    def examples(self, reason: SkipReason) -> list[str]:
        """Up to ``max_examples`` keys skipped for ``reason`` (with the decoder's message when there is one)."""
        found = [f"{key} ({detail})" if detail else key for (r, key), detail in self._records.items() if r is reason]
        return found[: self.max_examples]

    def summary(self) -> str:
        if not self.total:
            return "no item skipped"
        parts = [
            f"{reason.value}: {self.count(reason)}" + (f" (e.g. {', '.join(ex)})" if (ex := self.examples(reason)) else "")
            for reason in SkipReason
            if self.count(reason)
        ]
        return f"{self.total} item(s) skipped: " + "; ".join(parts)
