"""Qwen2-VL native resolution: smart_resize to multiples of 28 within [min_pixels, max_pixels],
14 px patches (each repeated over the 2 temporal frames), 2x2 merge into one LLM token.

Follows transformers' `Qwen2VLImageProcessor` / `smart_resize`: Python's `round` (half to even)
for the first guess, `floor` when scaling down to max_pixels, `ceil` when scaling up to
min_pixels, and a ValueError above an aspect ratio of 200.

Where the original `qwen_vl_utils.smart_resize` differs: it clamps the first guess to at least
one factor (`max(factor, round(...))`), so a side shorter than 14 px keeps 28 px there instead
of being scaled up with the whole image; e.g. 1000x10 becomes 1008x28 there and 560x28 in
transformers. vlmkit follows transformers, which is what the released checkpoints' processor
runs.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, View
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD, Resizer, copy_into, normalize_into
from vlmkit.registry import IMAGE_PROCESSORS

MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width), both multiples of `factor`, area within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) is above "
            f"Qwen2-VL's limit of {MAX_ASPECT_RATIO}"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patches_into(u8: torch.Tensor, dst: torch.Tensor, mean, std, exact: bool = False) -> torch.Tensor:
    """Normalise a uint8 (3, H, W) image into Qwen2-VL's patch order.

    `dst` is a float32 view (H/(m p), W/(m p), m, m, 3, T, p, p): merge windows row-major, the
    m x m patches inside each, then channels, temporal slots and pixels; every one of its T
    slots receives the image. One band of m*p image rows at a time is normalised in image
    order (long vectorised rows) into a buffer that stays in cache, then its patch rows move to
    their places; gathering patches straight from a whole normalised image is several times
    slower (dozens of interleaved 56-byte streams).
    """
    gh_m, gw_m, m, _, _, t, p, _ = dst.shape
    if tuple(u8.shape) != (3, gh_m * m * p, gw_m * m * p):
        raise ValueError(f"image {tuple(u8.shape)} does not fill a {gh_m}x{gw_m} grid of {m}x{m} windows of {p} px")
    band = torch.empty((3, m * p, gw_m * m * p), dtype=torch.float32)
    for row in range(gh_m):
        normalize_into(u8[:, row * m * p : (row + 1) * m * p], band, mean, std, exact)
        windows = band.view(3, m, p, gw_m, m, p).permute(3, 1, 4, 0, 2, 5)
        copy_into(windows.unsqueeze(4).expand(gw_m, m, m, 3, t, p, p), dst[row])
    return dst


class Qwen2VLProcessor(ImageProcessor):
    native_resolution = True
    # Its tower's 3D patch embedding spans `temporal_patch_size` frames: video frames fill it.
    reads_temporal_patches = True

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        temporal_patch_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resample: str = "bicubic",
        backend: str = "torch",
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
    ):
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend
        # Video frames' smart_resize bounds (Qwen2-VL's video processor has its own); None: the image ones.
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels

    def for_video(self) -> Qwen2VLProcessor:
        """This processor with the video frames' pixel bounds (temporal-patch videos)."""
        if self.video_min_pixels is None and self.video_max_pixels is None:
            return self
        return Qwen2VLProcessor(self.patch_size, self.merge_size, self.temporal_patch_size,
                                self.video_min_pixels or self.min_pixels, self.video_max_pixels or self.max_pixels,
                                self.mean, self.std, self.resample, self.backend)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def layout(self, width: int, height: int) -> TokenLayout:
        rh, rw = self.resized_size(width, height)
        gh, gw = rh // self.patch_size, rw // self.patch_size
        return TokenLayout(
            visual_tokens=gh * gw // self.merge_size**2,
            parts={"resized": [rw, rh], "grid_thw": [1, gh, gw], "patches": gh * gw, "merge": self.merge_size},
            special_tokens=2,  # <|vision_start|> ... <|vision_end|>
        )

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Flat patches (gh*gw, 3*T*p*p) in the merge-window order the vision tower expects."""
        rh, rw = self.resized_size(*image.size)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        u8 = Resizer(image, self.resample, self.backend).resize(rh, rw)
        gh, gw = rh // p, rw // p
        out = torch.empty((gh * gw, 3, t, p * p), dtype=torch.float32)
        # A still image is its own T frames: every temporal slot gets the same patch.
        patches_into(u8, out.view(gh // m, gw // m, m, m, 3, t, p, p), self.mean, self.std, self.backend == "pil")
        return out.view(gh * gw, 3 * t * p * p), (1, gh, gw)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        pixels, thw = self.pixels(image)
        p = self.patch_size
        view = View("patches", (thw[1] * p, thw[2] * p), thw)
        return ProcessedImage(pixel_values=pixels, layout=self.layout(*image.size), extra={"image_grid_thw": thw},
                              views=(view,), image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        return Text("<|vision_start|>"), Slots(layout.visual_tokens), Text("<|vision_end|>")

    # ---- video: frames in temporal patches (call on `for_video()`, the frames' bounds) ----------
    def temporal_patch_layout(self, width: int, height: int, frames: int) -> TokenLayout:
        """`temporal_patch_size` consecutive frames per patch (the odd last frame repeated)."""
        _, gh, gw = self.layout(width, height).parts["grid_thw"]
        t = math.ceil(frames / self.temporal_patch_size)
        return TokenLayout(t * gh * gw // self.merge_size**2, {"grid_thw": [t, gh, gw]}, special_tokens=2)

    def temporal_patch_group(self, frames: list[Image.Image]) -> tuple[ProcessedImage, tuple[int, int, int]]:
        pixels, thw = self.video_pixels(frames)
        w, h = frames[0].size
        layout = self.temporal_patch_layout(w, h, len(frames))
        view = View("patches", (thw[1] * self.patch_size, thw[2] * self.patch_size), thw)
        group = ProcessedImage(pixels, layout, {"video_grid_thw": thw}, views=(view,), image_size=(h, w))
        m = self.merge_size
        return group, (thw[0], thw[1] // m, thw[2] // m)

    def video_pixels(self, frames: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Qwen2-VL video patches: consecutive frames fill the temporal axis of each patch."""
        w, h = frames[0].size
        rh, rw = self.resized_size(w, h)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        t, gh, gw = -(-len(frames) // tp), rh // p, rw // p
        out = torch.empty((t * gh * gw, 3, tp, p * p), dtype=torch.float32)
        slots = out.view(t, gh // m, gw // m, m, m, 3, tp, p, p)
        # Each frame goes straight into its temporal slot of every patch; a short last group
        # repeats the last frame, as the reference does.
        for i in range(t * tp):
            if i < len(frames):
                u8 = Resizer(frames[i], self.resample, self.backend).resize(rh, rw)
            patches_into(u8, slots[i // tp, :, :, :, :, :, i % tp : i % tp + 1], self.mean, self.std,
                         exact=self.backend == "pil")
        return out.view(t * gh * gw, 3 * tp * p * p), (t, gh, gw)


@IMAGE_PROCESSORS.register("qwen2vl")
def build_qwen2vl(config, tokens_per_image: int | None = None) -> Qwen2VLProcessor:
    """`tokens_per_image` is ignored: the count follows from smart_resize."""
    o = dict(config.options)
    return Qwen2VLProcessor(
        patch_size=o.get("patch_size", 14),
        merge_size=o.get("merge_size", 2),
        temporal_patch_size=o.get("temporal_patch_size", 2),
        min_pixels=o.get("min_pixels", 56 * 56),
        max_pixels=o.get("max_pixels", 28 * 28 * 1280),
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        backend=o.get("backend", "torch"),
        video_min_pixels=o.get("video_min_pixels"),
        video_max_pixels=o.get("video_max_pixels"),
    )
