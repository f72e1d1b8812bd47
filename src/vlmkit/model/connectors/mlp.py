"""Per-patch projections: linear, and LLaVA-1.5's 2-layer GELU MLP. Every patch token survives."""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class LinearOptions(ConnectorOptions):
    bias: bool = True


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    Options = LinearOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: LinearOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.proj = nn.Linear(vision_dim, llm_dim, bias=options.bias)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(features)


class MLPOptions(ConnectorOptions):
    # LLaVA-1.5 uses the LLM width as the hidden width ("mlp2x_gelu").
    hidden_size: int | None = None
    # Normalise vision features first: towers like EfficientNet end in unnormalised activations
    # whose scale differs wildly from an LLM's embeddings.
    input_norm: bool = False


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    Options = MLPOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: MLPOptions):
        super().__init__(vision_dim, llm_dim, options)
        hidden = options.hidden_size or llm_dim
        self.norm = nn.LayerNorm(vision_dim) if options.input_norm else nn.Identity()
        self.fc1 = nn.Linear(vision_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features))))
