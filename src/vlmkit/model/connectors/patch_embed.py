"""Encoder-free input (Fuyu): raw pixel patches, linearly embedded straight into the LLM.

There is no vision transformer; the "tower" only cuts the image into p x p patches and
flattens each to 3*p*p values, and the connector is the one linear layer that turns a patch
into an LLM token. All visual computation happens inside the LLM, the open stand-in for the
native multimodal pattern.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.model.connectors.layers import check_tokens
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.model.vision import VisionTower
from vlmkit.registry import CONNECTORS, VISION_TOWERS


class PatchifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patch_size: int = Field(default=30, ge=1)
    num_channels: int = 3


class PatchifyTower(VisionTower):
    from_files = False  # no weights at all: nothing is read from files, nothing pretrained to protect

    def __init__(self, config: PatchifyConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.hidden_size = config.num_channels * config.patch_size**2
        # Zero-size and never trained: it only gives the model a dtype/device to cast pixels to,
        # which callers read from the tower's parameters.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def grid(self, image_size: int) -> tuple[int, int]:
        return self.grid_hw(image_size, image_size)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"patchify: image {width}x{height} is not a multiple of the patch size {p} (pad it first)")
        return height // p, width // p

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        rows, cols = self.grid_hw(h, w)
        p = self.patch_size
        # Channel order within a patch: (row, col, channel), Fuyu's patch flattening.
        x = pixel_values.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, rows * cols, p * p * c)


@VISION_TOWERS.register("patchify")
def build_patchify(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    return PatchifyTower(PatchifyConfig.model_validate(cfg.config or {}))


class PatchEmbedOptions(ConnectorOptions):
    bias: bool = True


@CONNECTORS.register("patch-embed")
class PatchEmbedConnector(Connector):
    Options = PatchEmbedOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PatchEmbedOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.proj = nn.Linear(vision_dim, llm_dim, bias=options.bias)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        check_tokens(features, grid, "patch-embed")
        return self.proj(features)
