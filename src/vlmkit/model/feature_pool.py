"""Spatial pooling of a view's tower features, before the connector.

A processor may ask for it per view (`View.pool`: a mode named here and a stride): LLaVA-NeXT-Video
reads each video frame at the image resolution and average-pools its feature map 2x2, so a frame
costs a quarter of an image's tokens. The pooled map is what the connector reads, so the token
count follows from the pooled grid. Modes are PyTorch's 2D pools with kernel = stride (the rows
and columns that do not fill a window are dropped, as `nn.AvgPool2d` drops them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.registry import Registry

FEATURE_POOLS: Registry = Registry("feature pool")
FEATURE_POOLS.register("average")(lambda: F.avg_pool2d)
FEATURE_POOLS.register("max")(lambda: F.max_pool2d)


def pooled_grid(grid: tuple[int, int], pool: tuple[str, int] | None) -> tuple[int, int]:
    """(rows, cols) of a feature map after the view's pooling (unchanged without one)."""
    if pool is None:
        return grid
    stride = pool[1]
    if stride < 1 or grid[0] < stride or grid[1] < stride:
        raise ValueError(f"cannot pool a {grid[0]}x{grid[1]} feature map with stride {stride}")
    return grid[0] // stride, grid[1] // stride


def pool_features(features: torch.Tensor, grid: tuple[int, int], pool: tuple[str, int] | None) -> torch.Tensor:
    """(t, h*w, C) row-major features -> (t, h'*w', C) pooled with `pool` = (mode, stride)."""
    if pool is None:
        return features
    mode, stride = pool
    op = FEATURE_POOLS.build(mode)
    t, _, c = features.shape
    h, w = grid
    fmap = features.transpose(1, 2).reshape(t, c, h, w)
    return op(fmap, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)
