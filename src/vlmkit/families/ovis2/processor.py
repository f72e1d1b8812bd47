"""Ovis2's tiling: the fewest square tiles that cover the image well, a thumbnail first, and the
image's structure written with its own tokens.

The grid (transformers' `Ovis2ImageProcessor`, `use_covering_area_grid`): every (a, b) with
a*b <= max_patches, ordered by tile count (width-major, stably), is scored by how much of the
image its tiles cover at full detail: the image is split into a rows by b columns, and a region
keeps its area when its longer side fits one tile, else it is scaled down to fit. The fewest
tiles with coverage above 0.9 win (then the higher coverage); failing that, the highest
coverage. The image is then resized to a *columns* by b rows of tiles: the split that scores a
grid and the resize that uses it read (a, b) in opposite orders, and transformers' processor
does so, so vlmkit does too. Without `covering`, the grid is GotOcr2's closest aspect ratio
(`get_optimal_tiled_canvas`, Aya Vision's).

Views: the whole image resized to one tile (the only view when there is one tile), then the
tiles row-major. One image becomes `<IMG_START>` + the thumbnail's tokens + `<IMG_GRID>`, then,
when there are several tiles, each tile's tokens with `<IMG_COL>` between columns and `<IMG_ROW>`
between rows, then `<IMG_END>` (`Ovis2Processor.replace_image_token`'s string).
"""

from __future__ import annotations

import functools

import torch
from PIL import Image

from vlmkit.families.aya_vision.processor import got_ocr2_grids
from vlmkit.families.internvl.processor import DynamicTileProcessor, closest_grid
from vlmkit.processing.base import ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import Resizer, normalize_into, tiles_into
from vlmkit.registry import IMAGE_PROCESSORS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TAGS = {"start": "<IMG_START>", "grid": "<IMG_GRID>", "col": "<IMG_COL>", "row": "<IMG_ROW>", "end": "<IMG_END>"}
COVERING_THRESHOLD = 0.9


def _covered(left: int, upper: int, right: int, lower: int, side: int) -> float:
    """A region's area at full detail: scaled down until its longer side fits one tile."""
    long, short = max(right - left, lower - upper), min(right - left, lower - upper)
    if long > side:
        short, long = short / long * side, side
    return long * short


@functools.lru_cache(maxsize=256)
def covering_grid(width: int, height: int, side: int, max_num: int) -> tuple[int, int]:
    """(a, b): Ovis2's fewest-tiles grid covering more than 0.9 of the image (see the module)."""
    scored = []
    for a, b in got_ocr2_grids(1, max_num):
        row_h, col_w = height // a, width // b
        total = sum(_covered(c * col_w, r * row_h, width if c == b - 1 else (c + 1) * col_w,
                             height if r == a - 1 else (r + 1) * row_h, side)
                    for r in range(a) for c in range(b))
        scored.append(((a, b), total / (width * height)))
    enough = [s for s in scored if s[1] > COVERING_THRESHOLD]
    if enough:
        return min(enough, key=lambda s: (s[0][0] * s[0][1], -s[1]))[0]
    return min(scored, key=lambda s: (-s[1], s[0][0] * s[0][1]))[0]


class Ovis2TileProcessor(DynamicTileProcessor):
    def __init__(self, image_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5, min_num: int = 1,
                 max_num: int = 12, covering: bool = True, mean=CLIP_MEAN, std=CLIP_STD, resample: str = "bicubic",
                 backend: str = "torch", tags: dict | None = None):
        super().__init__(image_size, patch_size, downsample_ratio, min_num, max_num, True, mean, std, resample, backend)
        self.covering = covering
        self.grids = got_ocr2_grids(min_num, max_num)
        self.tags = {**TAGS, **(tags or {})}

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of tiles."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        if self.max_num == 1:
            return 1, 1
        if self.covering:
            return covering_grid(width, height, self.image_size, self.max_num)
        return closest_grid(width, height, self.grids, self.image_size)

    def layout(self, width: int, height: int) -> TokenLayout:
        layout = super().layout(width, height)
        rows, cols = layout.parts["grid"]
        # Start, grid and end, then a separator between neighbouring tiles.
        separators = (rows * (cols - 1) + rows - 1) if layout.parts["thumbnail"] else 0
        return TokenLayout(layout.visual_tokens, layout.parts, special_tokens=3 + separators)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(thumbnail + tiles, 3, S, S), or the one tile."""
        w, h = image.size
        s = self.image_size
        cols, rows = self.grid(w, h)
        src = Resizer(image, self.resample, self.backend)
        exact = self.backend == "pil"
        if cols * rows == 1:
            out = torch.empty((1, 3, s, s), dtype=torch.float32)
            normalize_into(src.resize(s, s), out[0], self.mean, self.std, exact)
            return out
        out = torch.empty((cols * rows + 1, 3, s, s), dtype=torch.float32)
        normalize_into(src.resize(s, s), out[0], self.mean, self.std, exact)
        tiles_into(src.resize(rows * s, cols * s), out[1:], rows, cols, self.mean, self.std, exact)
        return out

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        layout = self.layout(*image.size)
        pixels = self.pixels(image)
        roles = ["thumbnail"] * int(layout.parts["thumbnail"]) + ["tile"] * layout.parts["tiles"]
        return ProcessedImage(pixel_values=pixels, layout=layout, views=image_views(pixels, roles),
                              image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        t, per_tile = self.tags, layout.parts["tokens_per_tile"]
        out: list[Segment] = [Text(t["start"]), Slots(per_tile), Text(t["grid"])]
        if layout.parts["thumbnail"]:
            rows, cols = layout.parts["grid"]
            for r in range(rows):
                for c in range(cols):
                    out.append(Slots(per_tile))
                    if c < cols - 1:
                        out.append(Text(t["col"]))
                if r < rows - 1:
                    out.append(Text(t["row"]))
        out.append(Text(t["end"]))
        return tuple(out)


@IMAGE_PROCESSORS.register("ovis2")
def build_ovis2(config, tokens_per_image: int | None = None) -> Ovis2TileProcessor:
    """`tokens_per_image` is ignored: the count follows from the tile grid."""
    o = dict(config.options)
    return Ovis2TileProcessor(image_size=config.image_size, patch_size=o.get("patch_size", 14),
                              downsample_ratio=o.get("downsample_ratio", 0.5), min_num=o.get("min_num", 1),
                              max_num=o.get("max_num", 12), covering=o.get("covering", True), mean=config.mean, std=config.std,
                              resample=config.resample, backend=o.get("backend", "torch"), tags=o.get("tags"))
