"""Aya Vision's projector (`AyaVisionMultiModalProjector`): pixel shuffle, a LayerNorm over the
merged channels (none in Cohere2-Vision's, `layernorm: false`), then a SwiGLU MLP whose first layer makes both halves (`linear_1` gives
[x | gate], `silu(gate) * x`, `linear_2` back to the LLM width).

The shuffle is the core `pixel-shuffle` one: Aya's reshape/permute sequence puts the channels of
a merged token in (block row, block column, channel) order and the tokens row-major, which is
`pixel_shuffle`'s layout. The split SwiGLU is not one of `pixel-shuffle`'s projectors, so the
projector is its own connector, `pixel-shuffle-swiglu`; its tensors keep transformers' names, so
the weight map is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.model.connectors.base import Connector
from vlmkit.model.connectors.pixel_shuffle import ShuffleOptions, pixel_shuffle, shuffle_factor
from vlmkit.registry import CONNECTORS


class SwiGLUShuffleOptions(ShuffleOptions):
    # ratio: 1 / Aya's downsample_factor.
    norm_eps: float = 1e-6  # adapter_layer_norm_eps
    # alignment_intermediate_size: linear_1's width, x and gate together (None: the LLM width, as transformers).
    hidden_size: int | None = None
    # False: no LayerNorm before linear_1 (Cohere2-Vision's projector).
    layernorm: bool = True


@CONNECTORS.register("pixel-shuffle-swiglu")
class SwiGLUShuffleConnector(Connector):
    Options = SwiGLUShuffleOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: SwiGLUShuffleOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.factor = shuffle_factor(options.ratio)
        merged = vision_dim * self.factor**2
        self.hidden = options.hidden_size or llm_dim
        if self.hidden % 2:
            raise ValueError(f"pixel-shuffle-swiglu: hidden_size {self.hidden} must be even (it holds x and the gate)")
        self.layernorm = nn.LayerNorm(merged, eps=options.norm_eps) if options.layernorm else nn.Identity()
        self.linear_1 = nn.Linear(merged, self.hidden)
        self.linear_2 = nn.Linear(self.hidden // 2, llm_dim)

    def check_grid(self, grid: tuple[int, int]) -> None:
        h, w = grid
        if h % self.factor or w % self.factor:
            raise ValueError(f"pixel-shuffle-swiglu merges {self.factor}x{self.factor} blocks, but the vision tower gives a "
                             f"{h}x{w} feature grid; change the image size or the ratio")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] // self.factor, grid[1] // self.factor

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.check_grid(grid)
        if features.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"pixel-shuffle-swiglu: got {features.shape[1]} feature tokens for a {grid[0]}x{grid[1]} grid")
        x, gate = self.linear_1(self.layernorm(pixel_shuffle(features, grid, self.factor))).chunk(2, dim=-1)
        return self.linear_2(F.silu(gate) * x)
