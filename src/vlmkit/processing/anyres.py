"""LLaVA-NeXT AnyRes: a grid of encoder-size tiles chosen from pinpoint resolutions, plus a
squashed base image, with unpadding and one newline embedding per feature row.

Rules follow transformers' `LlavaNextImageProcessor` / `LlavaNextProcessor` (and the original
LLaVA-NeXT `select_best_resolution` / `unpad_image`, which they restate):

* resolution: maximise the effective area `min(int(w*s) * int(h*s), w*h)` with
  `s = min(W/w, H/h)`; on equal effective area take the least waste; on a full tie the
  earlier pinpoint wins (strict comparisons);
* the image is resized to fit the resolution (`ceil` on the constrained side), centred on a
  zero (black) canvas, and cut into tiles row by row; the base image is a plain resize to the
  tile size, aspect ratio ignored, and comes first;
* tokens: base `p*p` + the unpadded tile-feature grid + one newline per unpadded row, where
  unpadding rounds with `int(round(x, 7))` exactly like the model's `unpad_image`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image

from vlmkit.processing.base import Arrangement, ImageProcessor, ProcessedImage, TokenLayout, image_views
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD, Resizer, normalize_into, tiles_into
from vlmkit.registry import IMAGE_PROCESSORS

LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps the most pixels, then wastes the least."""
    best = None
    best_effective, best_waste = 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    if best is None:
        raise ValueError("no grid pinpoints given")
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image scaled to fit inside the target; the free side rounds up."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """Feature rows/cols left after cutting the padding off a (grid_h, grid_w) feature map."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return grid_h - 2 * pad, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return grid_h, grid_w - 2 * pad


class AnyResProcessor(ImageProcessor):
    """AnyRes tiling.

    `unpad=False, newline=False, base_size=...` turns it into the plain "tiles + thumbnail"
    scheme of the lecture's example (tiles of 448 px with a 224 px global view).
    `pixel_shuffle` divides the token count of every view by its square (InternVL-style
    compression applied to the same grid).
    """

    def __init__(
        self,
        image_size: int = 336,
        patch_size: int = 14,
        grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resample: str = "bicubic",
        backend: str = "torch",
        unpad: bool = True,
        newline: bool = True,
        base_size: int | None = None,
        pixel_shuffle: int = 1,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        for ph, pw in grid_pinpoints:
            if ph % image_size or pw % image_size:
                raise ValueError(f"pinpoint {ph}x{pw} is not a multiple of the tile size {image_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_pinpoints = tuple(tuple(p) for p in grid_pinpoints)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend
        self.unpad, self.newline = unpad, newline
        # Row newlines are the model's learned `image_newline` embedding.
        self.learned_newline = bool(newline)
        self.base_size = base_size or image_size
        if self.base_size % patch_size:
            raise ValueError(f"base_size {self.base_size} is not a multiple of patch_size {patch_size}")
        self.pixel_shuffle = pixel_shuffle

    def layout(self, width: int, height: int) -> TokenLayout:
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        s, p, r = self.image_size, self.patch_size, self.pixel_shuffle
        best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
        rows, cols = best_h // s, best_w // s
        feat_h, feat_w = rows * (s // p) // r, cols * (s // p) // r
        if self.unpad:
            feat_h, feat_w = unpadded_grid(height, width, feat_h, feat_w)
        tile_tokens = feat_h * feat_w
        newline_tokens = feat_h if self.newline else 0
        base_tokens = ((self.base_size // p) // r) ** 2
        resized_h, resized_w = fit_size(height, width, best_h, best_w)
        return TokenLayout(
            visual_tokens=base_tokens + tile_tokens + newline_tokens,
            parts={
                "grid": [rows, cols],
                "tiles": rows * cols,
                "base_image": [self.base_size, self.base_size],
                "best_resolution": [best_w, best_h],
                "resized": [resized_w, resized_h],
                "feature_grid": [feat_h, feat_w],
                "base_tokens": base_tokens,
                "tile_tokens": tile_tokens,
                "newline_tokens": newline_tokens,
            },
        )

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(1 + rows*cols, 3, S, S) float32: base image first, then tiles row-major."""
        w, h = image.size
        s = self.image_size
        best_h, best_w = select_best_resolution(h, w, self.grid_pinpoints)
        rows, cols = best_h // s, best_w // s
        new_h, new_w = fit_size(h, w, best_h, best_w)
        src = Resizer(image, self.resample, self.backend)
        if self.base_size != s:
            raise ValueError("pixels() needs base_size == image_size; the lecture example's layout is token-only")
        exact = self.backend == "pil"
        out = torch.empty((1 + rows * cols, 3, s, s), dtype=torch.float32)
        normalize_into(src.resize(s, s), out[0], self.mean, self.std, exact)
        # The resized image sits centred on a zero canvas of the best resolution.
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        tiles_into(src.resize(new_h, new_w), out[1:], rows, cols, self.mean, self.std, exact, top, left)
        return out

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        w, h = image.size
        layout = self.layout(w, h)
        pixels = self.pixels(image)
        rows, cols = layout.parts["grid"]
        return ProcessedImage(
            pixel_values=pixels,
            layout=layout,
            extra={"image_size": (h, w)},
            views=image_views(pixels, ["thumbnail"] + ["tile"] * (rows * cols)),
            image_size=(h, w),
            arrangement=Arrangement("anyres", tiles=(rows, cols), first_tile=1, unpad=self.unpad, newline=self.newline),
        )


@IMAGE_PROCESSORS.register("anyres")
def build_anyres(config, tokens_per_image: int | None = None) -> AnyResProcessor:
    """`tokens_per_image` is ignored: AnyRes token counts depend on the image size."""
    o = dict(config.options)
    return AnyResProcessor(
        image_size=config.image_size,
        patch_size=o.get("patch_size", 14),
        grid_pinpoints=o.get("grid_pinpoints", LLAVA_NEXT_PINPOINTS),
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        backend=o.get("backend", "torch"),
        unpad=o.get("unpad", True),
        newline=o.get("newline", True),
        base_size=o.get("base_size"),
        pixel_shuffle=o.get("pixel_shuffle", 1),
    )


def max_tiles_size(height: int, width: int, tile_h: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of a feature map after the anyres_max_N limit (transformers' rounding)."""
    if not max_tiles:
        return height, width
    ratio = math.sqrt(height * width / (max_tiles * tile_h**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width
