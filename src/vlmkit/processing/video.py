"""Video: decode with PyAV, sample frames, compress them in time, and turn the result into the
same per-"image" pixel rows and token layouts the rest of vlmkit already carries.

A video becomes G frame groups. Each group is one row of pixels for the vision tower and one
token group in the prompt, so the collator, packing, the frozen-tower feature cache and prefix
fusion need nothing video-specific. How frames become groups is the compression mode:

* `none`: every sampled frame is a group (frames x tokens per frame).
* `pool`: the sampled frames are split into `pooled_frames` consecutive time windows and each
  window's frames are averaged. The mean is taken on the normalised pixels, which is an affine
  function of the raw pixels, so it equals the normalised mean frame; for towers whose first
  layer is a linear patch embedding it is also the mean of the first-layer features. The token
  count per video is fixed whatever its length.
* `temporal-patch`: Qwen2-VL's tubelets of 2 frames. A processor that `reads_temporal_patches`
  (its tower has a 3D patch embedding: Qwen2-VL's) fills the temporal axis of each patch with
  consecutive frames (`temporal_patch_layout` / `temporal_patch_group`); other families have no
  3D patch embedding, so each pair is averaged (a temporal window of exactly 2).

Sampling keeps the time (seconds) of every frame it takes. Frame counts come from the
container when it records one; WebM (Matroska) records none, so there the frames are counted
by decoding. A container that promises more frames than it can decode is reported as
truncated rather than silently giving fewer frames.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, TokenLayout

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
DEFAULT_MAX_FRAME_PIXELS = 8192 * 8192


class VideoLoadError(ValueError):
    """A video that cannot be used; the message names the file."""


@dataclass(frozen=True)
class VideoInput:
    """Marks a visual input as a video (a path), where a list mixes images and videos."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class VideoOptions:
    # smolvlm: SmolVLM2's sampler: round(fps x duration) frames, at most max_frames, from
    # np.linspace over the frames (truncated), skipping skip_secs at both ends of long videos.
    # glm4v: GLM-4.1V's sampler: one frame every 1/fps seconds (rounded up to a frame, repeats
    # dropped), an even count (the last frame repeated), over at most 300 s.
    sampling: Literal["uniform", "fps", "smolvlm", "glm4v"] = "uniform"
    num_frames: int = 8  # uniform: exactly this many frames
    fps: float = 1.0  # fps: this many frames per second of video ...
    min_frames: int = 1  # ... but at least this many
    max_frames: int = 32  # ... and at most this many
    compression: Literal["none", "pool", "temporal-patch"] = "none"
    pooled_frames: int = 4  # pool: the number of time windows (token groups) per video
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS  # a frame larger than this is refused before decoding
    skip_secs: float = 1.0  # smolvlm sampling: seconds skipped at each end of a long video

    def __post_init__(self):
        if self.sampling not in ("uniform", "fps", "smolvlm", "glm4v"):
            raise ValueError(f"video sampling must be 'uniform', 'fps', 'smolvlm' or 'glm4v', got {self.sampling!r}")
        if self.compression not in ("none", "pool", "temporal-patch"):
            raise ValueError(f"video compression must be 'none', 'pool' or 'temporal-patch', got {self.compression!r}")
        if self.num_frames < 1 or self.min_frames < 1 or self.max_frames < self.min_frames or self.pooled_frames < 1:
            raise ValueError("video frame counts must be positive, with min_frames <= max_frames")
        if self.fps <= 0:
            raise ValueError("video fps must be positive")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "VideoOptions":
        options = dict(options or {})
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown video option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**options)


@dataclass
class VideoInfo:
    frames: int  # decodable frames in the stream
    fps: float
    width: int
    height: int
    counted: bool  # True when the count comes from decoding (WebM), not the container

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


@dataclass
class Clip:
    frames: list[Image.Image]
    timestamps: list[float]  # seconds, one per frame
    indices: list[int]  # frame numbers in the stream
    info: VideoInfo


# ---- decoding -----------------------------------------------------------------------------

def _open(path: Path):
    import av

    if not path.is_file():
        raise VideoLoadError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise VideoLoadError(f"{path}: video file is empty")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoLoadError(f"{path}: cannot open the video (corrupt or truncated?): {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoLoadError(f"{path}: the file has no video stream")
    return container


def _check_resolution(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise VideoLoadError(f"{path}: video has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise VideoLoadError(
            f"{path}: video frames are {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} (raise video.max_frame_pixels if this is intended)"
        )


def _decode(container, path: Path, keep: set[int] | None):
    """Decode the first video stream; yield (index, frame) for the kept indices (all when None)."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    index = 0
    try:
        for frame in container.decode(stream):
            if keep is None or index in keep:
                yield index, frame
            index += 1
    except av.FFmpegError as e:
        raise VideoLoadError(f"{path}: decoding failed after {index} frame(s) (corrupt or truncated?): {e}") from None


def probe(path: str | os.PathLike, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> VideoInfo:
    """Frame count, frame rate and size, decoding only where the container keeps no count."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_resolution(path, width, height, max_frame_pixels)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        declared = int(stream.frames or 0)
        counted = declared <= 0
        if counted:
            # WebM / Matroska keep no frame count: decoding is the only exact count.
            declared = sum(1 for _ in _decode(container, path, keep=None))
        if fps <= 0 and stream.duration and stream.time_base and declared:
            fps = declared / float(stream.duration * stream.time_base)
    finally:
        container.close()
    if declared == 0:
        raise VideoLoadError(f"{path}: the video has zero frames")
    return VideoInfo(frames=declared, fps=fps or 1.0, width=width, height=height, counted=counted)


def sample_indices(total: int, fps: float, options: VideoOptions, source: str = "video") -> list[int]:
    """Frame numbers to keep: `num_frames` spread evenly from the first frame to the last
    (uniform), or one every 1/fps seconds clamped to [min_frames, max_frames] and spread the same
    way (fps). Asking for more frames than the video has is an error, not a repeated frame."""
    if total <= 0:
        raise VideoLoadError(f"{source}: the video has zero frames")
    if options.sampling == "smolvlm":
        return smolvlm_indices(total, fps, options)
    if options.sampling == "glm4v":
        return glm4v_indices(total, fps, options)
    if options.sampling == "uniform":
        n = options.num_frames
        what = f"{n} frames requested (video.num_frames)"
    else:
        duration = total / fps
        n = min(options.max_frames, max(options.min_frames, math.floor(duration * options.fps)))
        what = f"{n} frames requested ({options.fps:g} fps over {duration:.2f} s, min {options.min_frames}, max {options.max_frames})"
    if n > total:
        raise VideoLoadError(f"{source}: has {total} frame(s), fewer than the {what}")
    if n == 1:
        return [(total - 1) // 2]
    # Evenly spaced including both ends: the first and last frames carry where motion starts and ends.
    return [int(round(i * (total - 1) / (n - 1))) for i in range(n)]


def glm4v_indices(total: int, fps: float, options: VideoOptions, max_duration: float = 300.0) -> list[int]:
    """transformers' `Glm4vVideoProcessor.sample_frames` (its `fps`; `max_duration` 300 s)."""
    last = total - 1
    duration = total / fps if fps > 0 else float(last + 1)
    if duration <= max_duration:
        n = max(math.floor(duration * options.fps), 1)
        wanted = [min(last, math.ceil(i * fps / options.fps)) for i in range(n)]
    else:
        n = int(max_duration * options.fps)
        wanted = list(range(total)) if n >= total else [min(last, math.ceil(t * fps)) for t in np.linspace(0, duration, n)]
    out = list(dict.fromkeys(wanted))
    return out + out[-1:] if len(out) % 2 else out


def smolvlm_indices(total: int, fps: float, options: VideoOptions) -> list[int]:
    """transformers' `SmolVLMVideoProcessor.sample_frames` (max_frames = its num_frames)."""
    duration = total / fps if fps > 0 else 0.0
    n = max(1, min(int(round(options.fps * duration)), options.max_frames))
    start, end = 0, total - 1
    if options.skip_secs > 0 and (duration - 2 * options.skip_secs) > options.max_frames * options.fps:
        start, end = int(options.skip_secs * fps), int(total - options.skip_secs * fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return sorted(set(np.linspace(start, end, n, dtype=int).tolist()))


def load_clip(path: str | os.PathLike, options: VideoOptions = VideoOptions()) -> Clip:
    """Decode the sampled frames of one video as RGB images, with their times in seconds."""
    path = Path(path)
    info = probe(path, options.max_frame_pixels)
    indices = sample_indices(info.frames, info.fps, options, str(path))
    keep = set(indices)
    container = _open(path)
    got: dict[int, tuple[Image.Image, float]] = {}
    try:
        stream = container.streams.video[0]
        for index, frame in _decode(container, path, keep):
            t = float(frame.time) if frame.time is not None else index / info.fps
            got[index] = (frame.to_image().convert("RGB"), t)
            if len(got) == len(keep):
                break
        declared = int(stream.frames or 0)
    finally:
        container.close()
    missing = [i for i in indices if i not in got]
    if missing:
        raise VideoLoadError(
            f"{path}: truncated: the container declares {declared or info.frames} frames but frame {missing[0]} "
            "could not be decoded"
        )
    frames = [got[i][0] for i in indices]
    for im in frames:
        _check_resolution(path, im.width, im.height, options.max_frame_pixels)
    return Clip(frames=frames, timestamps=[got[i][1] for i in indices], indices=indices, info=info)


# ---- frames -> token groups ----------------------------------------------------------------

@dataclass
class ProcessedVideo:
    groups: list[ProcessedImage]  # one pixel row + layout per token group, in time order
    layout: TokenLayout  # the whole video: all groups' tokens, and the parts below
    timestamps: list[float]  # seconds of each sampled frame
    group_times: list[tuple[float, float]]  # (first, last) frame time of each group
    grid_thw: tuple[int, int, int] | None = None  # LLM grid (t, h, w) when the family has one
    extra: dict[str, Any] = field(default_factory=dict)


def _windows(n: int, groups: int) -> list[range]:
    """Split n frames into `groups` consecutive windows of near-equal size (earlier ones longer)."""
    if groups > n:
        raise VideoLoadError(f"cannot pool {n} sampled frame(s) into {groups} windows (video.pooled_frames)")
    bounds = [round(k * n / groups) for k in range(groups + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(groups)]


def group_plan(frames: int, options: VideoOptions) -> list[range]:
    if options.compression == "none":
        return [range(i, i + 1) for i in range(frames)]
    if options.compression == "pool":
        return _windows(frames, options.pooled_frames)
    # temporal-patch: pairs, the odd last frame paired with itself
    return [range(i, min(i + 2, frames)) for i in range(0, frames, 2)]


def video_layout(processor: ImageProcessor, width: int, height: int, frames: int, options: VideoOptions) -> TokenLayout:
    """Token layout of a video of `frames` sampled frames of this size, without touching pixels."""
    processor = processor.for_video()
    if frames <= 0:
        raise ValueError("a video needs at least one sampled frame")
    per_frame = processor.layout(width, height)
    parts: dict[str, Any] = {"frames": frames, "compression": options.compression, "frame_tokens": per_frame.visual_tokens}
    if _temporal_patches(processor, options):
        video = processor.temporal_patch_layout(width, height, frames)
        parts.update(groups=1, grid_thw=list(video.parts["grid_thw"]), tokens_per_group=video.visual_tokens,
                     uncompressed_tokens=frames * per_frame.visual_tokens)
        return TokenLayout(visual_tokens=video.visual_tokens, parts=parts, special_tokens=per_frame.special_tokens)
    groups = len(group_plan(frames, options))
    parts.update(groups=groups, tokens_per_group=per_frame.visual_tokens,
                 uncompressed_tokens=frames * per_frame.visual_tokens)
    if "grid_thw" in per_frame.parts:
        parts["grid_thw"] = [groups, *per_frame.parts["grid_thw"][1:]]
    return TokenLayout(visual_tokens=groups * per_frame.visual_tokens, parts=parts,
                       special_tokens=groups * per_frame.special_tokens)


def _temporal_patches(processor: ImageProcessor, options: VideoOptions) -> bool:
    """Whether the video's frames fill the temporal axis of the tower's 3D patches."""
    return options.compression == "temporal-patch" and processor.reads_temporal_patches


def process_clip(processor: ImageProcessor, clip: Clip, options: VideoOptions) -> ProcessedVideo:
    processor = processor.for_video()
    frames = clip.frames
    sizes = {im.size for im in frames}
    if len(sizes) != 1:
        raise VideoLoadError(f"video frames change size mid-stream ({sorted(sizes)}); vlmkit needs one frame size")
    w, h = frames[0].size
    layout = video_layout(processor, w, h, len(frames), options)
    times = clip.timestamps
    if _temporal_patches(processor, options):
        group, grid = processor.temporal_patch_group(frames)
        return ProcessedVideo([group], layout, times, [(times[0], times[-1])], grid)
    per_frame = [processor.preprocess(im) for im in frames]
    groups = []
    for window in group_plan(len(frames), options):
        rows = torch.stack([per_frame[i].pixel_values for i in window])
        first = per_frame[window[0]]
        groups.append(ProcessedImage(rows.mean(0), first.layout, views=first.views, image_size=first.image_size,
                                     arrangement=first.arrangement))
    spans = [(times[wd[0]], times[wd[-1]]) for wd in group_plan(len(frames), options)]
    grid = None
    if "grid_thw" in per_frame[0].layout.parts:
        _, gh, gw = per_frame[0].layout.parts["grid_thw"]
        merge = per_frame[0].layout.parts.get("merge", 1)
        grid = (len(groups), gh // merge, gw // merge)
    return ProcessedVideo(groups, layout, times, spans, grid, extra={"duration": clip.info.duration})


def placeholder_text(processor: ImageProcessor, video: ProcessedVideo, image_token: str) -> str:
    frames = processor.for_video()
    return processor.video_text([frames.placeholder_text(g.layout, image_token) for g in video.groups], video.timestamps,
                                video.extra.get("duration", 0.0))


def video_key(path: Path, options: VideoOptions, group: int) -> str:
    """Cache key of one token group: the file, its size and mtime, and the sampling that made it."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}:{options}"
    return f"{path}#{hashlib.sha256(ident.encode()).hexdigest()[:12]}:g{group}"


def load_video(processor: ImageProcessor, path: str | os.PathLike, options: VideoOptions) -> ProcessedVideo:
    return process_clip(processor, load_clip(path, options), options)


# ---- writing (synthetic data and tests) ----------------------------------------------------

CODECS = {".mp4": "libx264", ".webm": "libvpx", ".avi": "mpeg4", ".mkv": "libx264"}


def write_video(path: str | os.PathLike, frames: list[np.ndarray | Image.Image], fps: int = 8, codec: str | None = None) -> Path:
    """Encode RGB frames with PyAV; the codec follows the suffix (H.264 / VP8 / MPEG-4 part 2)."""
    import av

    path = Path(path)
    codec = codec or CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: no default codec for {path.suffix!r}; pass codec=")
    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    if not arrays:
        raise ValueError("write_video needs at least one frame")
    h, w = arrays[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Near-lossless and intra-friendly: tiny synthetic frames must keep their few pixels.
            stream.options = {"crf": "10", "preset": "ultrafast"}
        elif codec in ("libvpx", "libvpx-vp9"):
            stream.options = {"crf": "4", "b:v": "2M"}
        else:
            stream.bit_rate = 4_000_000
        for arr in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def with_frames(options: VideoOptions, n: int) -> VideoOptions:
    return replace(options, sampling="uniform", num_frames=n)
