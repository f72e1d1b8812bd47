"""Aya Vision: GotOcr2's tiling (1..max_patches square tiles chosen by aspect ratio, plus a
thumbnail when there is more than one), each tile a block of image tokens after its tag.

One image becomes `<|START_OF_IMG|>`, then `TILE_1` .. `TILE_n` each followed by the tile's
tokens (only when there are several tiles), then `TILE_GLOBAL` and the thumbnail's (or the single
tile's) tokens, then `<|END_OF_IMG|>`: `AyaVisionProcessor.replace_image_token`'s string.

The tiling is InternVL's (`vlmkit.families.internvl.processor`) with the candidate grids in the order
transformers' `get_all_supported_aspect_ratios` lists them (width-major, then stably sorted by
tile count): on a tie in aspect ratio that order picks the grid, so vlmkit takes GotOcr2's
rather than the original InternVL set order (they differ only when `min_patches` > 1).
"""

from __future__ import annotations

from vlmkit.processing.base import Segment, Slots, Text, TokenLayout
from vlmkit.families.internvl.processor import DynamicTileProcessor
from vlmkit.processing.images import HALF_MEAN, HALF_STD
from vlmkit.registry import IMAGE_PROCESSORS

START, END, TILE, TILE_GLOBAL = "<|START_OF_IMG|>", "<|END_OF_IMG|>", "TILE", "TILE_GLOBAL"


def got_ocr2_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(cols, rows) candidates in transformers' GotOcr2 order."""
    grids = [(w, h) for w in range(1, max_num + 1) for h in range(1, max_num + 1) if min_num <= w * h <= max_num]
    return sorted(grids, key=lambda g: g[0] * g[1])


class AyaVisionProcessor(DynamicTileProcessor):
    def __init__(self, image_size: int = 364, patch_size: int = 14, downsample_ratio: float = 0.5, min_num: int = 1,
                 max_num: int = 12, mean=HALF_MEAN, std=HALF_STD, resample: str = "bicubic", backend: str = "torch",
                 start: str = START, end: str = END, tile: str = TILE, tile_global: str = TILE_GLOBAL):
        # GotOcr2 always adds the thumbnail when it cuts more than one tile.
        super().__init__(image_size, patch_size, downsample_ratio, min_num, max_num, True, mean, std, resample, backend)
        self.grids = got_ocr2_grids(min_num, max_num)
        self.start, self.end, self.tile, self.tile_global = start, end, tile, tile_global

    def layout(self, width: int, height: int) -> TokenLayout:
        layout = super().layout(width, height)
        tags = layout.parts["tiles"] + 1 if layout.parts["thumbnail"] else 1
        # Start, end and one tag per view (TILE_k may take more than one token in a given vocabulary).
        return TokenLayout(layout.visual_tokens, layout.parts, special_tokens=2 + tags)

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        per_tile = layout.parts["tokens_per_tile"]
        out: list[Segment] = [Text(self.start)]
        if layout.parts["thumbnail"]:
            for k in range(1, layout.parts["tiles"] + 1):
                out += [Text(f"{self.tile}_{k}"), Slots(per_tile)]
        out += [Text(self.tile_global), Slots(per_tile), Text(self.end)]
        return tuple(out)


@IMAGE_PROCESSORS.register("aya_vision")
def build_aya_vision(config, tokens_per_image: int | None = None) -> AyaVisionProcessor:
    """`tokens_per_image` is ignored: the count follows from the tile grid."""
    o = dict(config.options)
    return AyaVisionProcessor(image_size=config.image_size, patch_size=o.get("patch_size", 14),
                              downsample_ratio=o.get("downsample_ratio", 0.5), min_num=o.get("min_num", 1),
                              max_num=o.get("max_num", 12), mean=config.mean, std=config.std, resample=config.resample,
                              backend=o.get("backend", "torch"), start=o.get("start", START), end=o.get("end", END),
                              tile=o.get("tile", TILE), tile_global=o.get("tile_global", TILE_GLOBAL))
