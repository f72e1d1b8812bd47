"""Mistral3's connector: an RMSNorm on every patch, a learned merge of each s x s block of
patches into one (a bias-free linear over the block's concatenated channels), then LLaVA's
2-layer GELU MLP into the LLM width.

The block's channels are concatenated channel-major (channel, then row and column inside the
block), the order `torch.nn.functional.unfold` gives and transformers' `Mistral3PatchMerger`
uses, so its `merging_layer` weights load unchanged.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class PatchMergerOptions(ConnectorOptions):
    merge: int = Field(default=2, ge=1)  # s: s x s patches become one token
    norm_eps: float = 1e-5
    # Width of the MLP's hidden layer; Mistral3 uses the LLM width.
    hidden_size: int | None = None
    bias: bool = True  # biases of the MLP (Mistral3's multimodal_projector_bias)


def merge_blocks(features: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, (h/s)*(w/s), C*s*s), each block's channels channel-major (unfold order)."""
    b, _, c = features.shape
    h, w = grid
    x = features.reshape(b, h // s, s, w // s, s, c)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, (h // s) * (w // s), c * s * s)


@CONNECTORS.register("patch-merger")
class PatchMergerConnector(Connector):
    Options = PatchMergerOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PatchMergerOptions):
        super().__init__(vision_dim, llm_dim, options)
        s = options.merge
        hidden = options.hidden_size or llm_dim
        self.norm = nn.RMSNorm(vision_dim, eps=options.norm_eps)
        self.merging_layer = nn.Linear(vision_dim * s * s, vision_dim, bias=False)
        self.fc1 = nn.Linear(vision_dim, hidden, bias=options.bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_dim, bias=options.bias)

    def check_grid(self, grid: tuple[int, int]) -> None:
        s = self.options.merge
        if grid[0] % s or grid[1] % s:
            raise ValueError(f"patch-merger merges {s}x{s} patches, but the vision tower gives a {grid[0]}x{grid[1]} "
                             f"feature grid; resize images to multiples of {s} patches (pixtral: options.spatial_merge: {s})")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        s = self.options.merge
        return grid[0] // s, grid[1] // s

    def num_tokens(self, grid: tuple[int, int]) -> int:
        h, w = self.output_grid(grid)
        return h * w

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.check_grid(grid)
        merged = self.merging_layer(merge_blocks(self.norm(features), grid, self.options.merge))
        return self.fc2(self.act(self.fc1(merged)))
