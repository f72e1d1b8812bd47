"""The interface every preprocessing family implements.

A family turns one RGB image into pixel values for the vision tower and promises a token
layout: how many LLM slots the image takes. That promise is the single source of truth: the
prompt builder expands the placeholder into exactly that many image tokens, the budget
calculator reports it, and the model checks that the connector produced exactly that many.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class TokenLayout:
    """What one image costs in the LLM's sequence."""

    # Slots the model fills with visual embeddings (image-token positions).
    visual_tokens: int
    # Family-specific detail: tiles, grid, resized size, special tokens ...
    parts: dict[str, Any] = field(default_factory=dict)
    # Text tokens the family adds around or between the visual slots ([IMG_BREAK], newlines ...).
    special_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.visual_tokens + self.special_tokens


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # family-specific layout, e.g. (crops, 3, H, W)
    layout: TokenLayout
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. image_grid_thw


class ImageProcessor(ABC):
    """One preprocessing family."""

    @abstractmethod
    def layout(self, width: int, height: int) -> TokenLayout:
        """Token layout for an image of this size, without touching pixels."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> ProcessedImage:
        """Pixels for the vision tower, plus the layout (must equal `layout(w, h)`)."""

    def placeholder_text(self, layout: TokenLayout, image_token: str) -> str:
        """The text that replaces one `<image>` placeholder: one image token per visual slot."""
        return image_token * layout.visual_tokens
