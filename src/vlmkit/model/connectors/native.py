"""Projection over a native-resolution encoder (Pixtral): every patch of an image at its own
size becomes one LLM token. The tower (`rope-vit`) has no fixed grid, so this connector takes
any grid; row-break tokens ([IMG_BREAK]) are text tokens the processor places, not outputs here.
"""

from __future__ import annotations

from typing import Literal

import torch

from vlmkit.model.connectors.layers import check_tokens, projector
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class NativeOptions(ConnectorOptions):
    # Pixtral-12B's released adapter is Linear-GELU-Linear; "linear" is the single projection.
    projector: Literal["linear", "mlp"] = "linear"
    hidden_size: int | None = None
    bias: bool = True


@CONNECTORS.register("native")
class NativeConnector(Connector):
    Options = NativeOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: NativeOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.proj = projector(vision_dim, llm_dim, options.projector, options.hidden_size, options.bias)

    def check_grid(self, grid: tuple[int, int]) -> None:
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"native: empty feature grid {grid}")

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        check_tokens(features, grid, "native")
        return self.proj(features)
