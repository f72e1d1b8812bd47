"""Qwen3-VL's preprocessing: images exactly as Qwen2-VL's (`qwen2vl`: smart_resize to multiples
of patch x merge, here 16 px patches and 32 px merge windows), and videos in temporal patches.

A video's frames are resized by `video_smart_resize`, transformers' `Qwen3VLVideoProcessor`
rule: the pixel bounds hold for the whole clip (frames rounded to the temporal patch x height x
width), not for one frame, and a side shorter than one merge window is first scaled up to it.
(transformers 5.25 leaves qwen-vl-utils' per-frame cap off unless asked; so does vlmkit.) Every
temporal patch is its own `<|vision_start|> ... <|vision_end|>` block, preceded by
its time as text, `<1.5 seconds>`: the mean time of the patch's first and last frame (an odd
last frame is paired with itself), one decimal, as transformers' `Qwen3VLProcessor` writes it.
The M-RoPE positions then number each frame as its own block (`processing/mrope.py`)."""

from __future__ import annotations

import math
from dataclasses import replace

from vlmkit.families.qwen2_vl.processor import MAX_ASPECT_RATIO, Qwen2VLProcessor
from vlmkit.processing.base import Segment, Slots, Text, TokenLayout
from vlmkit.registry import IMAGE_PROCESSORS

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def frame_times(timestamps: list[float], temporal_patch_size: int = 2) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame's time."""
    if not timestamps:
        return []
    padded = list(timestamps) + [timestamps[-1]] * (-len(timestamps) % temporal_patch_size)
    return [(padded[i] + padded[i + temporal_patch_size - 1]) / 2 for i in range(0, len(padded), temporal_patch_size)]


def video_smart_resize(frames: int, height: int, width: int, temporal: int = 2, factor: int = 32,
                       min_pixels: int = 128 * 32 * 32, max_pixels: int = 768 * 32 * 32) -> tuple[int, int]:
    """(height, width) of every frame of a `frames`-frame clip: multiples of `factor`, with
    (frames rounded to `temporal`) x height x width within [min_pixels, max_pixels]. A clip of
    fewer frames than one temporal patch counts as one patch (its last frame is repeated)."""
    frames = max(frames, temporal)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) is above "
                         f"Qwen3-VL's limit of {MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


class _ClipFrames(Qwen2VLProcessor):
    """The frames of one clip: every frame resized to the clip's size."""

    def __init__(self, size: tuple[int, int], **settings):
        super().__init__(**settings)
        self.size = size

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        return self.size


class Qwen3VLProcessor(Qwen2VLProcessor):
    # The text around each temporal patch's slots (GLM-4.1V's processor names its own).
    block_start, block_end = VISION_START, VISION_END

    def for_video(self) -> Qwen3VLProcessor:
        if self.video_min_pixels is None and self.video_max_pixels is None:
            return self
        return type(self)(self.patch_size, self.merge_size, self.temporal_patch_size,
                                self.video_min_pixels or self.min_pixels, self.video_max_pixels or self.max_pixels,
                                self.mean, self.std, self.resample, self.backend)

    def _clip(self, width: int, height: int, frames: int) -> _ClipFrames:
        size = video_smart_resize(frames, height, width, self.temporal_patch_size, self.patch_size * self.merge_size,
                                  self.min_pixels, self.max_pixels)
        return _ClipFrames(size, patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                           mean=self.mean, std=self.std, resample=self.resample, backend=self.backend)

    def temporal_patch_layout(self, width: int, height: int, frames: int) -> TokenLayout:
        layout = self._clip(width, height, frames).temporal_patch_layout(width, height, frames)
        return replace(layout, special_tokens=2 * layout.parts["grid_thw"][0])  # a start and an end per temporal patch

    def temporal_patch_group(self, frames):
        w, h = frames[0].size
        group, grid = self._clip(w, h, len(frames)).temporal_patch_group(frames)
        return replace(group, layout=replace(group.layout, special_tokens=2 * grid[0])), grid

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        t = (layout.parts.get("grid_thw") or [1])[0]
        per_frame = layout.visual_tokens // t
        return (Text(self.block_start), Slots(per_frame), Text(self.block_end)) * t

    def video_text(self, groups: list[str], timestamps: list[float], duration: float) -> str:
        frames = self.frame_blocks(groups)
        times = frame_times(timestamps, self.temporal_patch_size)
        if len(times) != len(frames):
            raise ValueError(f"a video of {len(frames)} temporal patches has {len(timestamps)} frame times")
        return "".join(f"<{s:.1f} seconds>{f}" for s, f in zip(times, frames))

    def frame_blocks(self, groups: list[str]) -> list[str]:
        """Each temporal patch's text (its start, slots and end), in order."""
        return [self.block_start + block for g in groups for block in g.split(self.block_start)[1:]]


@IMAGE_PROCESSORS.register("qwen3vl")
def build_qwen3vl(config, tokens_per_image: int | None = None) -> Qwen3VLProcessor:
    """`tokens_per_image` is ignored: the count follows from smart_resize."""
    o = dict(config.options)
    return Qwen3VLProcessor(
        patch_size=o.get("patch_size", 16), merge_size=o.get("merge_size", 2), temporal_patch_size=o.get("temporal_patch_size", 2),
        min_pixels=o.get("min_pixels", 65536), max_pixels=o.get("max_pixels", 16777216), mean=config.mean, std=config.std,
        resample=config.resample, backend=o.get("backend", "torch"),
        video_min_pixels=o.get("video_min_pixels"), video_max_pixels=o.get("video_max_pixels"))
