"""2D average pooling + projection: k x k neighbouring patches are averaged into one token.

Same token saving as pixel shuffle at the same k, but the block's detail is blurred into its
mean instead of kept in the channels; the ablation measures what that costs on text.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlmkit.model.connectors._layers import check_tokens, projector
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class PoolingOptions(ConnectorOptions):
    kernel: int = Field(default=2, ge=1)
    projector: Literal["mlp", "linear"] = "mlp"
    hidden_size: int | None = None
    input_norm: bool = False


@CONNECTORS.register("pooling")
class PoolingConnector(Connector):
    Options = PoolingOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PoolingOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.norm = nn.LayerNorm(vision_dim) if options.input_norm else nn.Identity()
        self.proj = projector(vision_dim, llm_dim, options.projector, options.hidden_size)

    def check_grid(self, grid: tuple[int, int]) -> None:
        k = self.options.kernel
        if grid[0] % k or grid[1] % k:
            raise ValueError(f"pooling kernel {k} does not tile the {grid[0]}x{grid[1]} feature grid")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        k = self.options.kernel
        return grid[0] // k, grid[1] // k

    def num_tokens(self, grid: tuple[int, int]) -> int:
        k = self.options.kernel
        return (grid[0] // k) * (grid[1] // k)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.check_grid(grid)
        check_tokens(features, grid, "pooling")
        b, _, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        x = F.avg_pool2d(x, self.options.kernel).flatten(2).transpose(1, 2)
        return self.proj(self.norm(x))
