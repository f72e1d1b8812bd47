"""LLaVA-NeXT-Video's preprocessing: LLaVA-NeXT's AnyRes for images, and square crops for video
frames whose feature maps the model pools.

Frames follow transformers' `LlavaNextVideoVideoProcessor` (the same rule as CLIP's image
processor): the short side resized to `video_size` and the long side to
`int(video_size * long / short)`, a centred square of `video_size` cropped at offsets
`int((side - video_size) / 2)`, rescaled and normalised. Each frame is one `frame` view whose
feature map is pooled (`video_pool`: mode and stride, `model/feature_pool.py`) before the
projector, as the model's `vision_resampler` does: (video_size / patch / stride)^2 tokens a frame.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmkit.processing.anyres import LLAVA_NEXT_PINPOINTS, AnyResProcessor
from vlmkit.processing.base import ImageProcessor, ProcessedImage, TokenLayout, View
from vlmkit.processing.images import Resizer, normalize_into
from vlmkit.registry import IMAGE_PROCESSORS

POOL_MODES = ("average", "max")


def shortest_edge_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the short side at `side` and the long side truncated, as transformers'
    `get_resize_output_image_size(default_to_square=False)`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    return (side, new_long) if width <= height else (new_long, side)


class CenterCropProcessor(ImageProcessor):
    """Short side to `image_size`, centre crop of `image_size` squared; one view of `role`
    ("image", or "frame": a video frame on the tower's frame path) pooled by `pool`, taking
    `tokens` slots."""

    def __init__(self, image_size: int, tokens: int, mean, std, resample: str = "bicubic", backend: str = "torch",
                 role: str = "image", pool: tuple[str, int] | None = None):
        if image_size <= 0 or tokens <= 0:
            raise ValueError(f"image_size and tokens must be positive, got {image_size} and {tokens}")
        if pool is not None and (pool[0] not in POOL_MODES or int(pool[1]) < 1):
            raise ValueError(f"video_pool must be [mode, stride] with mode in {POOL_MODES} and stride >= 1, got {list(pool)}")
        self.image_size, self.tokens = image_size, tokens
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend
        self.role, self.pool = role, (pool[0], int(pool[1])) if pool else None

    def layout(self, width: int, height: int) -> TokenLayout:
        rw, rh = shortest_edge_size(width, height, self.image_size)
        return TokenLayout(visual_tokens=self.tokens, parts={"resized": [rw, rh], "crop": [self.image_size] * 2, "view": self.role})

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        w, h = image.size
        s = self.image_size
        rw, rh = shortest_edge_size(w, h, s)
        top, left = int((rh - s) / 2), int((rw - s) / 2)
        resized = Resizer(image, self.resample, self.backend).resize(rh, rw)
        pixels = torch.empty((1, 3, s, s), dtype=torch.float32)
        normalize_into(resized[:, top : top + s, left : left + s], pixels[0], self.mean, self.std, self.backend == "pil")
        return ProcessedImage(pixel_values=pixels, layout=self.layout(w, h), views=(View(self.role, (s, s), pool=self.pool),),
                              image_size=(h, w))


class AnyResVideoProcessor(AnyResProcessor):
    """LLaVA-NeXT's AnyRes for images; video frames through `frames` (a `CenterCropProcessor`)."""

    def __init__(self, *args, frames: CenterCropProcessor, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames = frames

    def for_video(self) -> ImageProcessor:
        return self.frames


def frame_tokens(video_size: int, patch_size: int, stride: int) -> int:
    return (video_size // patch_size // stride) ** 2


@IMAGE_PROCESSORS.register("anyres-video")
def build_anyres_video(config, tokens_per_image: int | None = None) -> AnyResVideoProcessor:
    """Options: those of `anyres`, plus `video_size` (the frame crop side; default the tile size)
    and `video_pool` ([mode, stride], default ["average", 2])."""
    o = dict(config.options)
    patch, backend = o.get("patch_size", 14), o.get("backend", "torch")
    mode, stride = o.get("video_pool") or ("average", 2)
    side = o.get("video_size") or config.image_size
    frames = CenterCropProcessor(side, frame_tokens(side, patch, int(stride)), config.mean, config.std, config.resample, backend,
                                 role="frame", pool=(mode, stride))
    return AnyResVideoProcessor(image_size=config.image_size, patch_size=patch, grid_pinpoints=o.get("grid_pinpoints", LLAVA_NEXT_PINPOINTS),
                                mean=config.mean, std=config.std, resample=config.resample, backend=backend, frames=frames)
