"""InternVL dynamic high-resolution tiling (InternVL 1.5 / 2): 1..max_num tiles of 448 px chosen
by aspect ratio, plus a 448 px thumbnail when there is more than one tile; 256 tokens per tile
after the 0.5 pixel shuffle ((448/14)^2 / 4).

Follows the original repository's `dynamic_preprocess` / `find_closest_aspect_ratio`:

* candidates are every (cols, rows) with min_num <= cols*rows <= max_num, ordered by tile count;
* the closest aspect ratio wins (strict `<`); on an exact tie in ratio difference the later
  (larger) candidate replaces the current one only while the image area exceeds half the
  candidate's tiled area;
* the image is resized (bicubic, aspect ratio ignored) to cols*448 x rows*448 and cut
  row-major; the thumbnail is the whole image resized to 448 x 448.

Where transformers differs: its `GotOcr2ImageProcessor.crop_image_to_patches` (used by the
InternVL port) enumerates candidates as an ordered list instead of the original's `set`, so
candidates with equal tile count can come in a different order. The order only matters when two
equal-count candidates tie on ratio difference (r and 1/r around the image's ratio), and with
min_num = 1 the 1x1 candidate is always strictly closer than such a pair, so both agree on
every size; with min_num > 1 they may pick different grids, and vlmkit follows the original.
The pixel path also differs in float order (torchvision ToTensor/Normalize vs numpy), below
1e-6.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import IMAGENET_MEAN, IMAGENET_STD, Resizer, normalize_into, tiles_into
from vlmkit.registry import IMAGE_PROCESSORS


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(cols, rows) candidates in the original's order: the set's iteration order, stably
    sorted by tile count."""
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids, tile: int) -> tuple[int, int]:
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


class DynamicTileProcessor(ImageProcessor):
    def __init__(
        self,
        image_size: int = 448,
        patch_size: int = 14,
        downsample_ratio: float = 0.5,
        min_num: int = 1,
        max_num: int = 12,
        use_thumbnail: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resample: str = "bicubic",
        backend: str = "torch",
    ):
        if not 1 <= min_num <= max_num:
            raise ValueError(f"need 1 <= min_num <= max_num, got {min_num}, {max_num}")
        self.image_size, self.patch_size = image_size, patch_size
        self.tokens_per_tile = int((image_size // patch_size) ** 2 * downsample_ratio**2)
        self.min_num, self.max_num, self.use_thumbnail = min_num, max_num, use_thumbnail
        self.grids = candidate_grids(min_num, max_num)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend

    def grid(self, width: int, height: int) -> tuple[int, int]:
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        return closest_grid(width, height, self.grids, self.image_size)

    def layout(self, width: int, height: int) -> TokenLayout:
        cols, rows = self.grid(width, height)
        tiles = cols * rows
        thumbnail = self.use_thumbnail and tiles != 1
        views = tiles + int(thumbnail)
        return TokenLayout(
            visual_tokens=views * self.tokens_per_tile,
            parts={
                "grid": [rows, cols],
                "tiles": tiles,
                "thumbnail": thumbnail,
                "resized": [cols * self.image_size, rows * self.image_size],
                "tokens_per_tile": self.tokens_per_tile,
            },
            special_tokens=2,  # <img> ... </img>
        )

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(tiles [+ thumbnail], 3, S, S) float32."""
        w, h = image.size
        s = self.image_size
        cols, rows = self.grid(w, h)
        thumbnail = self.use_thumbnail and cols * rows != 1
        src = Resizer(image, self.resample, self.backend)
        exact = self.backend == "pil"
        out = torch.empty((cols * rows + int(thumbnail), 3, s, s), dtype=torch.float32)
        tiles_into(src.resize(rows * s, cols * s), out[: cols * rows], rows, cols, self.mean, self.std, exact)
        if thumbnail:
            normalize_into(src.resize(s, s), out[-1], self.mean, self.std, exact)
        return out

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        layout = self.layout(*image.size)
        pixels = self.pixels(image)
        roles = ["tile"] * layout.parts["tiles"] + ["thumbnail"] * int(layout.parts["thumbnail"])
        return ProcessedImage(pixel_values=pixels, layout=layout, views=image_views(pixels, roles),
                              image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        return Text("<img>"), Slots(layout.visual_tokens), Text("</img>")


@IMAGE_PROCESSORS.register("dynamic")
def build_dynamic(config, tokens_per_image: int | None = None) -> DynamicTileProcessor:
    """`tokens_per_image` is ignored: the count follows from the tile grid."""
    o = dict(config.options)
    return DynamicTileProcessor(
        image_size=config.image_size,
        patch_size=o.get("patch_size", 14),
        downsample_ratio=o.get("downsample_ratio", 0.5),
        min_num=o.get("min_num", 1),
        max_num=o.get("max_num", 12),
        use_thumbnail=o.get("use_thumbnail", True),
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        backend=o.get("backend", "torch"),
    )
