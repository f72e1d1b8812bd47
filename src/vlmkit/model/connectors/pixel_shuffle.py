"""Pixel shuffle + projection (InternVL, Idefics3/SmolVLM, Qwen2-VL's 2x2 merger).

Each s x s block of neighbouring patch features is folded into the channel axis, so the LLM
sees s^2 fewer tokens, each carrying the full detail of its block (nothing is averaged away).
`ratio` is the per-side scale, InternVL's `downsample_ratio`: 0.5 merges 2x2 blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.model.connectors.layers import check_tokens, projector
from vlmkit.registry import CONNECTORS


def shuffle_factor(ratio: float) -> int:
    factor = round(1 / ratio)
    if abs(factor * ratio - 1) > 1e-6:
        raise ValueError(f"pixel-shuffle ratio {ratio} is not 1/integer (0.5, 0.25, 1/3 ...)")
    return factor


def pixel_shuffle(features: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, (h/s)*(w/s), s*s*C); channels of a merged token are its block's
    patches in row-major order, the layout InternVL's and Idefics3's reshapes produce."""
    b, _, c = features.shape
    h, w = grid
    x = features.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // factor) * (w // factor), factor * factor * c)


class ShuffleOptions(ConnectorOptions):
    """The merge ratio every pixel-shuffle connector takes: 1/s for an s x s merge."""

    ratio: float = Field(default=0.5, gt=0, le=1)

    @field_validator("ratio")
    @classmethod
    def _integer_factor(cls, ratio: float) -> float:
        shuffle_factor(ratio)
        return ratio


class PixelShuffleOptions(ShuffleOptions):
    # "post": LayerNorm over the merged s^2*C channels (InternVL's mlp1);
    # "pre": LayerNorm on each patch before merging (Qwen2-VL's PatchMerger); "none": Idefics3.
    norm: Literal["post", "pre", "none"] = "post"
    norm_eps: float = 1e-5
    # LayerNorm (InternVL, Qwen2-VL) or RMSNorm (Qwen2.5-VL's PatchMerger).
    norm_kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    projector: Literal["mlp", "linear"] = "mlp"
    # InternVL uses the LLM width; Qwen2-VL keeps the merged width (s^2*C).
    hidden_size: int | None = None
    bias: bool = True


@CONNECTORS.register("pixel-shuffle")
class PixelShuffleConnector(Connector):
    Options = PixelShuffleOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PixelShuffleOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.factor = shuffle_factor(options.ratio)
        merged = vision_dim * self.factor**2
        norm = nn.LayerNorm if options.norm_kind == "layernorm" else nn.RMSNorm
        self.norm = {
            "post": lambda: norm(merged, eps=options.norm_eps),
            "pre": lambda: norm(vision_dim, eps=options.norm_eps),
            "none": nn.Identity,
        }[options.norm]()
        self.proj = projector(merged, llm_dim, options.projector, options.hidden_size, options.bias)

    def check_grid(self, grid: tuple[int, int]) -> None:
        h, w = grid
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"pixel-shuffle ratio {self.options.ratio} merges {self.factor}x{self.factor} blocks, "
                f"but the vision tower gives a {h}x{w} feature grid ({h} or {w} is not divisible by {self.factor}); "
                "change the image size or the ratio"
            )

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] // self.factor, grid[1] // self.factor

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.check_grid(grid)
        check_tokens(features, grid, "pixel-shuffle")
        if self.options.norm == "pre":
            features = self.norm(features)
        x = pixel_shuffle(features, grid, self.factor)
        if self.options.norm == "post":
            x = self.norm(x)
        return self.proj(x)
