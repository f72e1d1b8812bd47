"""Cohere2-Vision's tiling: the image squashed onto the tile canvas that needs the least
up-scaling (or, when every canvas shrinks it, the least down-scaling), cut into square tiles, plus
a thumbnail of the whole image when there is more than one tile.

Follows transformers' `Cohere2VisionImageProcessor` (`get_optimal_tiled_canvas` over every
cols x rows grid of at most `max_patches` tiles, sorted stably by tile count; `min_patches` plays
no part there) and `Cohere2VisionProcessor.replace_image_token`: `<|START_OF_IMG|>`, then per
view (tiles row-major, the thumbnail last) its tokens and `<|IMG_LINE_BREAK|>`, then
`<|END_OF_IMG|>`. The image processor needs torchvision; vlmkit's tiles are InternVL's
(`families/internvl/processor.py`) on the canvas this rule picks.
"""

from __future__ import annotations

from vlmkit.families.aya_vision.processor import got_ocr2_grids
from vlmkit.families.internvl.processor import DynamicTileProcessor
from vlmkit.processing.base import Segment, Slots, Text, TokenLayout
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD
from vlmkit.registry import IMAGE_PROCESSORS

START, END, LINE_BREAK = "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>"


def optimal_canvas(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """(cols, rows): the first grid (in `grids`' order) needing the least up-scaling to hold the
    image, or the one needing the least down-scaling when all shrink it."""
    scales = [min(c * tile / width, r * tile / height) for c, r in grids]
    if all(s < 1 for s in scales):
        return grids[max(range(len(grids)), key=lambda i: (scales[i], -i))]
    return grids[min(range(len(grids)), key=lambda i: (scales[i] if scales[i] >= 1 else 10e9, i))]


class Cohere2VisionTileProcessor(DynamicTileProcessor):
    def __init__(self, image_size: int = 512, patch_size: int = 16, downsample_ratio: float = 0.5, max_num: int = 12,
                 mean=CLIP_MEAN, std=CLIP_STD, resample: str = "bicubic", backend: str = "torch", start: str = START,
                 end: str = END, line_break: str = LINE_BREAK):
        super().__init__(image_size, patch_size, downsample_ratio, 1, max_num, True, mean, std, resample, backend)
        self.grids = got_ocr2_grids(1, max_num)
        self.start, self.end, self.line_break = start, end, line_break

    def grid(self, width: int, height: int) -> tuple[int, int]:
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        return optimal_canvas(width, height, self.image_size, self.grids)

    def layout(self, width: int, height: int) -> TokenLayout:
        layout = super().layout(width, height)
        views = layout.parts["tiles"] + int(layout.parts["thumbnail"])
        return TokenLayout(layout.visual_tokens, layout.parts, special_tokens=2 + views)

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        views = layout.parts["tiles"] + int(layout.parts["thumbnail"])
        per_view = (Slots(layout.parts["tokens_per_tile"]), Text(self.line_break))
        return (Text(self.start), *(per_view * views), Text(self.end))


@IMAGE_PROCESSORS.register("cohere2_vision")
def build_cohere2_vision(config, tokens_per_image: int | None = None) -> Cohere2VisionTileProcessor:
    """`tokens_per_image` is ignored: the count follows from the tile grid."""
    o = dict(config.options)
    return Cohere2VisionTileProcessor(image_size=config.image_size, patch_size=o.get("patch_size", 16),
                                      downsample_ratio=o.get("downsample_ratio", 0.5), max_num=o.get("max_num", 12),
                                      mean=config.mean, std=config.std, resample=config.resample, backend=o.get("backend", "torch"),
                                      start=o.get("start", START), end=o.get("end", END), line_break=o.get("line_break", LINE_BREAK))
