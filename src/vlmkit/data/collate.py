"""Batching encoded samples: right-padded for training, left-padded for generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.model.vlm import IGNORE_INDEX
from vlmkit.processing.prompt import EncodedSample


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (images, 3, H, W), images in sample order
    image_features: torch.Tensor | None = None  # cached frozen-tower features, same order
    num_images: int = 0

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.position_ids),
                     move(self.pixel_values), move(self.image_features), self.num_images)


def collate(samples: list[EncodedSample], pad_id: int, left_pad: bool = False, features: list[torch.Tensor] | None = None) -> Batch:
    """Pad to the longest sample. Left padding (generation) keeps every prompt's last token at
    the end; positions count real tokens only, so padding never shifts a sample's positions."""
    longest = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    labels = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(longest - n, longest) if left_pad else slice(0, n)
        input_ids[i, sl] = s.input_ids
        labels[i, sl] = s.labels
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pixel_list = [s.pixel_values for s in samples if s.pixel_values.numel()]
    pixels = torch.cat(pixel_list) if pixel_list else None
    feats = torch.cat(features) if features else None
    num_images = sum(len(s.layouts) for s in samples)
    return Batch([s.id for s in samples], input_ids, mask, labels, position_ids, pixels, feats, num_images)
