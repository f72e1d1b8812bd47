"""LFM2-VL: native resolution within a token budget, and 512 px tiles plus a thumbnail for large
images (the `lfm2_vl` processor).

transformers' `Lfm2VlImageProcessor` exists only for torchvision; this is its documented rule,
restated (tests check it against transformers' own layout functions and patch order):

* `smart_resize`: each side rounds (Python's `round`, half to even) to a multiple of
  patch * downsample (at least one); a result over `max_image_tokens` tokens is scaled down with
  `floor` by sqrt(h*w / max_pixels), one under `min_image_tokens` up with `ceil`;
* an image is "too large" when its sides, rounded the same way (but floored at one *patch*, not
  one block), cover more than `max_image_tokens * (patch * downsample)^2 * max_pixels_tolerance`
  pixels; only then (and when splitting is on) it is cut into a grid of `tile_size` tiles
  (`min_tiles` .. `max_tiles`, InternVL's closest-aspect rule over a `set` of grids sorted by
  tile count), resized to the grid's size as a whole (aspect ratio ignored) and cut row-major;
  the thumbnail is the `smart_resize` of the whole image;
* otherwise the image is the `smart_resize` alone, one view.

Each view is read at its own size by the NaFlex tower; tokens are (h / patch / downsample) x
(w / patch / downsample) per view. The text (`Lfm2VlProcessor._build_image_tokens`):
`<|image_start|>`, per tile `<|img_row_R_col_C|>` and its tokens, then `<|img_thumbnail|>` and
the thumbnail's tokens, then `<|image_end|>`; a single view has no tags inside.

Pixels: resized (bilinear, antialiased) as uint8, then (x / 255 - mean) / std. torchvision's
uint8 resize is torch's antialiased kernel, which vlmkit's default `torch` backend calls too.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.families.internvl.processor import candidate_grids, closest_grid
from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, View
from vlmkit.processing.images import HALF_MEAN, HALF_STD, Resizer, to_normalized
from vlmkit.registry import IMAGE_PROCESSORS

START, END, THUMBNAIL = "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"


def tile_tag(row: int, col: int) -> str:
    """The tag before tile (row, col), counted from 1."""
    return f"<|img_row_{row}_col_{col}|>"


def _round_to(x: float, factor: int) -> int:
    return round(x / factor) * factor


def smart_resize(height: int, width: int, unit: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of `unit` (patch * downsample), within the pixel budget."""
    h = max(unit, _round_to(height, unit))
    w = max(unit, _round_to(width, unit))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(unit, math.floor(height / beta / unit) * unit)
        w = max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / unit) * unit
        w = math.ceil(width * beta / unit) * unit
    return h, w


class Lfm2VlProcessor(ImageProcessor):
    native_resolution = True

    def __init__(self, tile_size: int = 512, patch_size: int = 16, downsample: int = 2, min_image_tokens: int = 64,
                 max_image_tokens: int = 256, min_tiles: int = 2, max_tiles: int = 10, use_thumbnail: bool = True,
                 split: bool = True, max_pixels_tolerance: float = 2.0, special_tokens: bool = True, mean=HALF_MEAN,
                 std=HALF_STD, resample: str = "bilinear", backend: str = "torch"):
        if split and not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"lfm2_vl: need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        if tile_size % (patch_size * downsample):
            raise ValueError(f"lfm2_vl: tile_size {tile_size} is not a multiple of patch_size * downsample "
                             f"({patch_size} * {downsample})")
        self.tile_size, self.patch_size, self.downsample = tile_size, patch_size, downsample
        self.unit = patch_size * downsample
        self.min_pixels, self.max_pixels = min_image_tokens * self.unit**2, max_image_tokens * self.unit**2
        self.max_image_tokens, self.max_pixels_tolerance = max_image_tokens, max_pixels_tolerance
        # Splitting off is transformers' min_tiles = max_tiles = 1: a 1x1 grid never splits.
        self.min_tiles, self.max_tiles = (min_tiles, max_tiles) if split else (1, 1)
        self.grids = candidate_grids(self.min_tiles, self.max_tiles)
        self.use_thumbnail, self.special_tokens = use_thumbnail, special_tokens
        self.mean, self.std, self.resample, self.backend = tuple(mean), tuple(std), resample, backend

    def _too_large(self, height: int, width: int) -> bool:
        h = max(self.patch_size, _round_to(height, self.unit))
        w = max(self.patch_size, _round_to(width, self.unit))
        return h * w > self.max_pixels * self.max_pixels_tolerance

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((rows, cols) of the tile grid, (1, 1) when not split; the (height, width) of the single
        view or the thumbnail)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        resized = smart_resize(height, width, self.unit, self.min_pixels, self.max_pixels)
        if self.max_tiles == 1 or not self._too_large(height, width):
            return (1, 1), resized
        cols, rows = closest_grid(width, height, self.grids, self.tile_size)
        return (rows, cols), resized

    def _tokens(self, height: int, width: int) -> int:
        return (height // self.unit) * (width // self.unit)

    def layout(self, width: int, height: int) -> TokenLayout:
        (rows, cols), (h, w) = self.plan(width, height)
        tiled = rows * cols > 1
        per_tile = self._tokens(self.tile_size, self.tile_size)
        whole = self._tokens(h, w) if (not tiled or self.use_thumbnail) else 0
        tags = (rows * cols + (1 if self.use_thumbnail else 0) if tiled else 0) + 2
        return TokenLayout(visual_tokens=rows * cols * per_tile * tiled + whole,
                           parts={"grid": [rows, cols], "tiled": tiled, "tokens_per_tile": per_tile, "resized": [h, w],
                                  "thumbnail": tiled and self.use_thumbnail, "tokens_for_image": whole},
                           special_tokens=tags if self.special_tokens else 0)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        width, height = image.size
        layout = self.layout(width, height)
        (rows, cols), (h, w) = self.plan(width, height)
        resizer = Resizer(image, self.resample, self.backend)
        exact = self.backend == "pil"
        views: list[View] = []
        pixels: list[torch.Tensor] = []
        if layout.parts["tiled"]:
            t = self.tile_size
            grid = to_normalized(resizer.resize(rows * t, cols * t), self.mean, self.std, exact=exact)
            tiles = grid.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
            pixels += list(tiles)
            views += [View("tile", (t, t))] * (rows * cols)
        if not layout.parts["tiled"] or self.use_thumbnail:
            pixels.append(to_normalized(resizer.resize(h, w), self.mean, self.std, exact=exact))
            views.append(View("thumbnail" if layout.parts["tiled"] else "image", (h, w)))
        # Views of different sizes sit top-left in a stack of the largest (ProcessedImage.view_pixels).
        big_h, big_w = max(v.size[0] for v in views), max(v.size[1] for v in views)
        stack = torch.zeros(len(views), 3, big_h, big_w)
        for i, p in enumerate(pixels):
            stack[i, :, : p.shape[-2], : p.shape[-1]] = p
        return ProcessedImage(pixel_values=stack, layout=layout, views=tuple(views), image_size=(height, width),
                              extra={"grid": (rows, cols), "resized": (h, w)})

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        tag = self.special_tokens
        out: list[Segment] = [Text(START)] if tag else []
        if layout.parts["tiled"]:
            rows, cols = layout.parts["grid"]
            for r in range(1, rows + 1):
                for c in range(1, cols + 1):
                    out += ([Text(tile_tag(r, c))] if tag else []) + [Slots(layout.parts["tokens_per_tile"])]
            if layout.parts["thumbnail"]:
                out += ([Text(THUMBNAIL)] if tag else []) + [Slots(layout.parts["tokens_for_image"])]
        else:
            out.append(Slots(layout.parts["tokens_for_image"]))
        return tuple(out + ([Text(END)] if tag else []))


@IMAGE_PROCESSORS.register("lfm2_vl")
def build_lfm2_vl(config, tokens_per_image: int | None = None) -> Lfm2VlProcessor:
    """`tokens_per_image` is ignored: the count follows from the image's size. `image_size` is
    the tile size."""
    o = dict(config.options)
    return Lfm2VlProcessor(tile_size=config.image_size, patch_size=o.get("patch_size", 16), downsample=o.get("downsample", 2),
                           min_image_tokens=o.get("min_image_tokens", 64), max_image_tokens=o.get("max_image_tokens", 256),
                           min_tiles=o.get("min_tiles", 2), max_tiles=o.get("max_tiles", 10),
                           use_thumbnail=o.get("use_thumbnail", True), split=o.get("split", True),
                           max_pixels_tolerance=o.get("max_pixels_tolerance", 2.0),
                           special_tokens=o.get("special_tokens", True), mean=config.mean, std=config.std,
                           resample=config.resample, backend=o.get("backend", "torch"))
