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

from vlmkit.model.connectors.layers import check_tokens, projector
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class PoolingOptions(ConnectorOptions):
    kernel: int = Field(default=2, ge=1)
    projector: Literal["mlp", "linear"] = "mlp"
    hidden_size: int | None = None
    input_norm: bool = False
    # A norm of the pooled tokens before the projection (Gemma 3: an RMSNorm scaling by 1 + w).
    pooled_norm: Literal["none", "layernorm", "rmsnorm", "gemma-rmsnorm"] = "none"
    norm_eps: float = 1e-6
    bias: bool = True


class GemmaRMSNorm(nn.Module):
    """RMSNorm in float32 whose weight is an offset from 1 (Gemma's: x / rms * (1 + w))."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def _pooled_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "gemma-rmsnorm":
        return GemmaRMSNorm(dim, eps)
    return nn.Identity()


@CONNECTORS.register("pooling")
class PoolingConnector(Connector):
    Options = PoolingOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PoolingOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.norm = nn.LayerNorm(vision_dim) if options.input_norm else nn.Identity()
        self.pooled_norm = _pooled_norm(options.pooled_norm, vision_dim, options.norm_eps)
        self.proj = projector(vision_dim, llm_dim, options.projector, options.hidden_size, bias=options.bias)

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
        return self.proj(self.pooled_norm(self.norm(x)))
