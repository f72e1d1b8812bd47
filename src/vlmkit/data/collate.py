"""Batching encoded samples: right-padded for training, left-padded for generation, or packed.

Every training batch also carries, per position, the sample it belongs to (`segments`, -1 on
padding) and its next-token target shifted *within* that sample (`targets`). The loss reads
those two, so a padded batch and a packed one of the same samples give the same loss, and a
packed row never asks one sample's last token to predict the next sample's first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from vlmkit.model.attention import prompt_mask
from vlmkit.core.types import IGNORE_INDEX
from vlmkit.processing.base import ProcessedImage, VisualBatch
from vlmkit.processing.prompt import EncodedSample


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None when packed (isolation comes from positions)
    labels: torch.Tensor  # (B, T)
    # (B, T), restarting at 0 for each sample of a packed row; (3, B, T) M-RoPE positions for
    # Qwen2-VL-family models, (4, B, T) when packed (a text row first, for sample isolation).
    position_ids: torch.Tensor
    # Every image (token group) of the batch in the order its tokens appear: its views with their
    # pixels and grids, its original size and arrangement. Images of different sizes batch together.
    images: list[ProcessedImage] = field(default_factory=list)
    # Cached frozen-tower features: per image, one (t, h*w, C) tensor per view.
    image_features: list[list[torch.Tensor]] | None = None
    num_images: int = 0
    targets: torch.Tensor | None = None  # (B, T): label of the next token of the same sample
    segments: torch.Tensor | None = None  # (B, T): index into `ids`, -1 on padding
    packed: bool = False

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def visuals(self) -> VisualBatch:
        """What the model reads of the batch's images (with the cached features, where set)."""
        return VisualBatch(self.images, self.image_features)

    @property
    def prompt_mask(self) -> torch.Tensor:
        """(B, T) True on each sample's tokens before its first supervised one (its prompt)."""
        return prompt_mask(self.labels, self.segments)

    @property
    def real_tokens(self) -> int:
        return int((self.segments >= 0).sum()) if self.segments is not None else int(self.attention_mask.sum())


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def _positions_3d(samples: list[EncodedSample]) -> bool:
    with_3d = [s.position_ids is not None for s in samples]
    if any(with_3d) and not all(with_3d):
        raise ValueError("a batch mixes samples with and without M-RoPE positions")
    return all(with_3d) and bool(samples)


def collate(samples: list[EncodedSample], pad_id: int, left_pad: bool = False, features: list | None = None) -> Batch:
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
    if _positions_3d(samples):
        # Padding gets position 1 on every axis, as Qwen2-VL's get_rope_index gives it.
        position_ids = torch.ones((3, B, longest), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            position_ids[:, i, slice(longest - n, longest) if left_pad else slice(0, n)] = s.position_ids
    images = [im for s in samples for im in s.images]
    return Batch([s.id for s in samples], input_ids, mask, labels, position_ids, images, features or None, len(images),
                 targets, segments)


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


def pack(samples: list[EncodedSample], pad_id: int, capacity: int, max_images: int | None = None, features: list | None = None) -> Batch:
    """Several samples per row, isolated from each other.

    Isolation comes from the position ids: they restart at 0 at each sample, and the attention
    mask is left as None, from which transformers' mask builder derives a block-diagonal causal
    mask (and flash-attention its varlen boundaries). Row padding is one more segment whose
    outputs no loss reads. `segments` keeps the input order of `samples`.
    """
    lengths = [len(s.input_ids) for s in samples]
    n_images = [len(s.images) for s in samples]
    mrope = _positions_3d(samples)
    rows = plan_packs(lengths, n_images, capacity, max_images)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, longest), pad_id, dtype=torch.long)
    labels = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((B, longest), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((B, longest), -1, dtype=torch.long)
    position_ids = torch.zeros((B, longest), dtype=torch.long)
    rope = torch.zeros((3, B, longest), dtype=torch.long) if mrope else None
    # Image slots are filled in row-major token order, so images must follow the packed order.
    feat_offsets = [0]
    for n in n_images:
        feat_offsets.append(feat_offsets[-1] + n)
    images, feat_list = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], lengths[i]
            input_ids[r, at : at + n] = s.input_ids
            labels[r, at : at + n] = s.labels
            targets[r, at : at + n] = shifted_targets(s.labels)
            segments[r, at : at + n] = i
            position_ids[r, at : at + n] = torch.arange(n)
            if rope is not None:
                rope[:, r, at : at + n] = s.position_ids
            images.extend(s.images)
            if features:
                feat_list.extend(features[feat_offsets[i] : feat_offsets[i + 1]])
            at += n
        if at < longest:
            position_ids[r, at:] = torch.arange(longest - at)
            if rope is not None:
                rope[:, r, at:] = torch.arange(longest - at)
    if rope is not None:
        # The text row tells the mask builder where each packed sample starts (see the field notes).
        position_ids = torch.cat([position_ids.unsqueeze(0), rope])
    return Batch([s.id for s in samples], input_ids, None, labels, position_ids, images, feat_list or None,
                 sum(n_images), targets, segments, packed=True)
