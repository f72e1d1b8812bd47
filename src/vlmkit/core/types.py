"""Leaf types of a training or evaluation sample, shared by processing, data, model and eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Label of a position that is not a target (prompt, padding, image slots); the value
# PyTorch's cross-entropy ignores by default.
IGNORE_INDEX = -100


class BadRecordError(ValueError):
    """A training or evaluation record that cannot be used; the message names it."""

    def __init__(self, record_id: str, reason: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Sample:
    id: str
    messages: list[Message]
    images: list[Path | bytes] = field(default_factory=list)  # bytes: an inline data URI's image
    videos: list[Path] = field(default_factory=list)
    # Where each image, then each video, came from in its record (`image`, `images[1]`, ...), so a
    # missing file is named by its field; not part of what the sample is (equality ignores it).
    media_fields: list[str] = field(default_factory=list, compare=False, repr=False)
