"""Batching encoded samples: right-padded for training, left-padded for generation, or packed.

Every training batch also carries, per position, the sample it belongs to (`segments`, -1 on
padding) and its next-token target shifted *within* that sample (`targets`). The loss reads
those two, so a padded batch and a packed one of the same samples give the same loss, and a
packed row never asks one sample's last token to predict the next sample's first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from vlmkit.model.vlm import IGNORE_INDEX
from vlmkit.processing.prompt import EncodedSample


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None when packed (isolation comes from positions)
    labels: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T); restart at 0 for each sample of a packed row
    pixel_values: torch.Tensor | None  # (images, 3, H, W), images in the order their tokens appear
    image_features: torch.Tensor | None = None  # cached frozen-tower features, same order
    num_images: int = 0
    targets: torch.Tensor | None = None  # (B, T): label of the next token of the same sample
    segments: torch.Tensor | None = None  # (B, T): index into `ids`, -1 on padding
    packed: bool = False

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def real_tokens(self) -> int:
        return int((self.segments >= 0).sum()) if self.segments is not None else int(self.attention_mask.sum())


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def collate(samples: list[EncodedSample], pad_id: int, left_pad: bool = False, features: list[torch.Tensor] | None = None) -> Batch:
    """Pad to the longest sample. Left padding (generation) keeps every prompt's last token at
    the end; positions count real tokens only, so padding never shifts a sample's positions."""
    longest = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    labels = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((B, longest), -1, dtype=torch.long)
    mask = torch.zeros((B, longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(longest - n, longest) if left_pad else slice(0, n)
        input_ids[i, sl] = s.input_ids
        labels[i, sl] = s.labels
        targets[i, sl] = shifted_targets(s.labels)
        segments[i, sl] = i
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pixel_list = [s.pixel_values for s in samples if s.pixel_values.numel()]
    pixels = torch.cat(pixel_list) if pixel_list else None
    feats = torch.cat(features) if features else None
    num_images = sum(len(s.layouts) for s in samples)
    return Batch([s.id for s in samples], input_ids, mask, labels, position_ids, pixels, feats, num_images, targets, segments)


def plan_packs(lengths: list[int], images: list[int], capacity: int, max_images: int | None = None) -> list[list[int]]:
    """First-fit decreasing: rows of sample indices, each within `capacity` tokens and
    `max_images` images. Deterministic (ties keep input order), so resumed runs pack alike."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    pics: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a pack of {capacity}")
        if max_images is not None and images[i] > max_images:
            raise ValueError(f"a sample with {images[i]} images exceeds max_images_per_pack={max_images}")
        for r in range(len(rows)):
            if lengths[i] <= room[r] and (max_images is None or pics[r] + images[i] <= max_images):
                rows[r].append(i)
                room[r] -= lengths[i]
                pics[r] += images[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
            pics.append(images[i])
    return rows


def pack(samples: list[EncodedSample], pad_id: int, capacity: int, max_images: int | None = None, features: list[torch.Tensor] | None = None) -> Batch:
    """Several samples per row, isolated from each other.

    Isolation comes from the position ids: they restart at 0 at each sample, and the attention
    mask is left as None, from which transformers' mask builder derives a block-diagonal causal
    mask (and flash-attention its varlen boundaries). Row padding is one more segment whose
    outputs no loss reads. `segments` keeps the input order of `samples`.
    """
    lengths = [len(s.input_ids) for s in samples]
    n_images = [len(s.layouts) for s in samples]
    rows = plan_packs(lengths, n_images, capacity, max_images)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    labels = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((B, longest), -1, dtype=torch.long)
    position_ids = torch.zeros((B, longest), dtype=torch.long)
    # Image slots are filled in row-major token order, so pixels must follow the packed order.
    feat_offsets = [0]
    for n in n_images:
        feat_offsets.append(feat_offsets[-1] + n)
    pixel_list, feat_list = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], lengths[i]
            input_ids[r, at : at + n] = s.input_ids
            labels[r, at : at + n] = s.labels
            targets[r, at : at + n] = shifted_targets(s.labels)
            segments[r, at : at + n] = i
            position_ids[r, at : at + n] = torch.arange(n)
            if s.pixel_values.numel():
                pixel_list.append(s.pixel_values)
            if features:
                feat_list.extend(features[feat_offsets[i] : feat_offsets[i + 1]])
            at += n
        if at < longest:
            position_ids[r, at:] = torch.arange(longest - at)
    pixels = torch.cat(pixel_list) if pixel_list else None
    feats = torch.cat(feat_list) if feat_list else None
    return Batch([s.id for s in samples], input_ids, None, labels, position_ids, pixels, feats, sum(n_images), targets, segments, packed=True)
