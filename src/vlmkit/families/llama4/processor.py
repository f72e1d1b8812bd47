"""Llama 4: 336 px tiles on the best-fitting canvas of at most `max_patches` tiles, the image
resized without distortion and padded, plus a global tile when there is more than one (the
`llama4` processor).

transformers' `Llama4ImageProcessor` exists only for torchvision; this is its documented rule,
restated (tests check it against transformers' own functions):

* canvases: every (rows, cols) with rows * cols <= max_patches, in `find_supported_resolutions`'
  order (by aspect ratio as first met, counting tile totals down);
* `get_best_fit`: the scale of each canvas is min(canvas_h / h, canvas_w / w) (float32); the
  smallest scale >= 1 wins, else the largest below 1; among canvases of that scale the smallest
  area (the first on a tie);
* the image is resized (bilinear, antialiased) to fit the canvas without distortion (`floor`), but
  upscaled no further than one tile side, padded with black at the bottom and right, cut into
  tiles row-major; the global tile is the whole image resized to one tile;
* pixels are rescaled and normalised in bfloat16, as the reference does.

One image becomes `<|image_start|>`, then (several tiles only) each row's tiles' tokens separated
by `<|tile_x_separator|>` and ended by `<|tile_y_separator|>`, then `<|image|>` and the global (or
only) tile's tokens, then `<|image_end|>`.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import HALF_MEAN, HALF_STD, Resizer
from vlmkit.registry import IMAGE_PROCESSORS

START, END, IMAGE, TILE_X, TILE_Y = "<|image_start|>", "<|image_end|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>"


def supported_canvases(max_patches: int) -> list[tuple[int, int]]:
    """(rows, cols) of every canvas, in transformers' order."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for total in range(max_patches, 0, -1):
        divisors = sorted({d for i in range(1, int(total**0.5) + 1) if total % i == 0 for d in (i, total // i)})
        for rows in divisors:
            by_ratio.setdefault(rows / (total // rows), []).append((rows, total // rows))
    return [c for canvases in by_ratio.values() for c in canvases]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    sizes = torch.tensor(canvases) * tile
    scale_h, scale_w = sizes[:, 0] / height, sizes[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    candidates = [i for i in range(len(canvases)) if scales[i] == chosen]
    return min((canvases[i] for i in candidates), key=lambda c: c[0] * c[1])


def fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


def bf16_normalized(u8: torch.Tensor, mean, std) -> torch.Tensor:
    """(3, H, W) uint8 -> (x / 255 - mean) / std computed in bfloat16, each step rounded as the
    reference rounds it, returned as float32."""
    x = u8.to(torch.bfloat16) * (1 / 255)
    m = torch.tensor(mean, dtype=torch.bfloat16).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.bfloat16).view(3, 1, 1)
    return ((x - m) / s).float()


class Llama4Processor(ImageProcessor):
    def __init__(self, tile: int = 336, patch_size: int = 14, pixel_shuffle_ratio: float = 0.5, max_patches: int = 16,
                 mean=HALF_MEAN, std=HALF_STD, resample: str = "bilinear", backend: str = "torch"):
        self.tile, self.patch_size, self.max_patches = tile, patch_size, max_patches
        downsample = round(1.0 / pixel_shuffle_ratio**2)
        self.tokens_per_tile = (tile // patch_size) ** 2 // downsample
        self.canvases = supported_canvases(max_patches)
        self.mean, self.std, self.resample, self.backend = tuple(mean), tuple(std), resample, backend

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((rows, cols) of the canvas, the (height, width) the image is resized to inside it)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        rows, cols = best_canvas(height, width, self.canvases, self.tile)
        th, tw = rows * self.tile, cols * self.tile
        limit_h, limit_w = min(max(height, self.tile), th), min(max(width, self.tile), tw)
        return (rows, cols), fit_without_distortion(height, width, limit_h, limit_w)

    def layout(self, width: int, height: int) -> TokenLayout:
        (rows, cols), resized = self.plan(width, height)
        tiles = rows * cols
        views = tiles + (1 if tiles > 1 else 0)
        separators = (rows * (cols - 1) + rows) if tiles > 1 else 0
        return TokenLayout(visual_tokens=views * self.tokens_per_tile,
                           parts={"grid": [rows, cols], "resized": list(resized), "tokens_per_tile": self.tokens_per_tile},
                           special_tokens=3 + separators)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        width, height = image.size
        layout = self.layout(width, height)
        (rows, cols), (h, w) = self.plan(width, height)
        resizer = Resizer(image, self.resample, self.backend)
        t = self.tile
        canvas = torch.zeros(3, rows * t, cols * t, dtype=torch.uint8)
        canvas[:, :h, :w] = resizer.resize(h, w)
        grid = bf16_normalized(canvas, self.mean, self.std)
        views = list(grid.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t))
        roles = ["tile"] * len(views)
        if rows * cols > 1:
            views.append(bf16_normalized(resizer.resize(t, t), self.mean, self.std))
            roles.append("thumbnail")
        pixels = torch.stack(views)
        return ProcessedImage(pixel_values=pixels, layout=layout, views=image_views(pixels, roles), image_size=(height, width),
                              extra={"grid": (rows, cols), "resized": (h, w)})

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        rows, cols = layout.parts["grid"]
        per = layout.parts["tokens_per_tile"]
        out: list[Segment] = [Text(START)]
        if rows * cols > 1:
            for _ in range(rows):
                for c in range(cols):
                    out += [Slots(per)] + ([Text(TILE_X)] if c < cols - 1 else [])
                out.append(Text(TILE_Y))
        return tuple(out + [Text(IMAGE), Slots(per), Text(END)])


@IMAGE_PROCESSORS.register("llama4")
def build_llama4(config, tokens_per_image: int | None = None) -> Llama4Processor:
    """`tokens_per_image` is ignored: the count follows from the canvas. `image_size` is the tile."""
    o = dict(config.options)
    return Llama4Processor(tile=config.image_size, patch_size=o.get("patch_size", 14),
                           pixel_shuffle_ratio=o.get("pixel_shuffle_ratio", 0.5), max_patches=o.get("max_patches", 16),
                           mean=config.mean, std=config.std, resample=config.resample, backend=o.get("backend", "torch"))
