"""Family assemblers: one image's per-view connector outputs -> its block of visual tokens.

A processor says how its views are arranged (`processing.base.Arrangement`); the assembler named
there turns the views' token sets into the tokens that fill that image's slots. Each assembler
also counts, from grids alone, how many tokens it will produce, which is how the model checks
at build time that a processor family and a connector agree.

* `concat`: views in order (fixed, InternVL tiles + thumbnail, Idefics3 crops + global image,
  Pixtral, Qwen2-VL, video groups).
* `anyres`: LLaVA-NeXT. The base view first, then the tile features stitched into one feature
  map, cut back to the image's aspect ratio (`unpad`), with a learned newline embedding after
  every row (`newline`). Rounding follows transformers' `unpad_image`. With `max_tiles` N
  (LLaVA-OneVision's anyres_max_N) a map larger than 1.1x the area of N tiles is first resized
  (bilinear) to about that area, as transformers' `LlavaOnevisionModel.pack_image_features`.
* `newline`: the views in order, then one newline embedding (LLaVA-OneVision's images in a
  multi-image prompt: the base view only).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlmkit.processing.anyres import max_tiles_size, unpadded_grid
from vlmkit.processing.base import Arrangement
from vlmkit.registry import Registry

# name -> (assemble, count)
ASSEMBLERS: Registry = Registry("assembler")

Grid = tuple[int, int]


def _concat(tokens: list[torch.Tensor], grids: list[Grid | None], arrangement: Arrangement,
            image_size: tuple[int, int] | None, newline: torch.Tensor | None) -> torch.Tensor:
    return torch.cat(tokens) if len(tokens) > 1 else tokens[0]


def _concat_count(counts: list[int], grids: list[Grid | None], arrangement: Arrangement, image_size) -> int:
    return sum(counts)


def _tile_map_grid(grids: list[Grid | None], arrangement: Arrangement) -> tuple[int, int, int, int]:
    rows, cols = arrangement.tiles
    tile_grids = grids[arrangement.first_tile : arrangement.first_tile + rows * cols]
    if any(g is None for g in tile_grids):
        raise ValueError("AnyRes stitches tile features into one map and unpads it, which needs a connector whose "
                         "output keeps the 2D grid (mlp, linear, pixel-shuffle, pooling); learned queries have none")
    if len(set(tile_grids)) != 1:
        raise ValueError(f"AnyRes tiles must share one feature grid, got {sorted(set(tile_grids))}")
    h, w = tile_grids[0]
    return rows, cols, h, w


def _anyres_map_size(rows, cols, h, w, arrangement: Arrangement, image_size) -> tuple[int, int, int, int]:
    """(height, width) of the stitched map and the (top, left) of the unpadded window."""
    big_h, big_w = rows * h, cols * w
    if not arrangement.unpad:
        return big_h, big_w, 0, 0
    orig_h, orig_w = image_size
    keep_h, keep_w = unpadded_grid(orig_h, orig_w, big_h, big_w)
    return keep_h, keep_w, (big_h - keep_h) // 2, (big_w - keep_w) // 2


def _anyres(tokens, grids, arrangement: Arrangement, image_size, newline) -> torch.Tensor:
    rows, cols, h, w = _tile_map_grid(grids, arrangement)
    first = arrangement.first_tile
    before = tokens[:first]
    tiles = torch.stack(tokens[first : first + rows * cols])  # (r*c, h*w, D)
    d = tiles.shape[-1]
    fmap = tiles.view(rows, cols, h, w, d).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, d)
    keep_h, keep_w, top, left = _anyres_map_size(rows, cols, h, w, arrangement, image_size)
    fmap = fmap[top : top + keep_h, left : left + keep_w]
    size = max_tiles_size(keep_h, keep_w, h, arrangement.max_tiles)
    if size != (keep_h, keep_w):
        fmap = F.interpolate(fmap.permute(2, 0, 1)[None], size=list(size), mode="bilinear")[0].permute(1, 2, 0)
        keep_h, keep_w = size
    if arrangement.newline:
        if newline is None:
            raise ValueError("AnyRes with newline tokens needs the model's image_newline embedding")
        fmap = torch.cat([fmap, newline.to(fmap.dtype).expand(keep_h, 1, d)], dim=1)
    after = tokens[first + rows * cols :]
    return torch.cat([*before, fmap.reshape(-1, d), *after])


def _anyres_count(counts, grids, arrangement: Arrangement, image_size) -> int:
    rows, cols, h, w = _tile_map_grid(grids, arrangement)
    keep_h, keep_w, _, _ = _anyres_map_size(rows, cols, h, w, arrangement, image_size)
    keep_h, keep_w = max_tiles_size(keep_h, keep_w, h, arrangement.max_tiles)
    first = arrangement.first_tile
    others = sum(counts[:first]) + sum(counts[first + rows * cols :])
    return others + keep_h * (keep_w + int(arrangement.newline))


def _newline(tokens, grids, arrangement: Arrangement, image_size, newline) -> torch.Tensor:
    if newline is None:
        raise ValueError("the newline arrangement needs the model's image_newline embedding")
    return torch.cat([*tokens, newline.to(tokens[0].dtype)[None]])


def _newline_count(counts, grids, arrangement: Arrangement, image_size) -> int:
    return sum(counts) + 1


ASSEMBLERS.register("concat")(lambda: (_concat, _concat_count))
ASSEMBLERS.register("anyres")(lambda: (_anyres, _anyres_count))
ASSEMBLERS.register("newline")(lambda: (_newline, _newline_count))


def assembler(name: str) -> tuple[Callable, Callable]:
    return ASSEMBLERS.build(name)
