"""LFM2-VL's vision tower: SigLIP2 NaFlex (`siglip2-naflex`), transformers' `Siglip2VisionModel`
reading each view at its own size.

NaFlex takes flattened patches with their (h, w) patch grid and a mask over the padded batch;
its learned position grid is resized (bilinear, antialiased) to each image's grid. vlmkit hands
the tower views of one size together, so here every view of a call has the same grid and no
padding: the patches are cut as transformers' `convert_image_to_patches` cuts them (each patch
flattened (row, column, channel)), the mask is all ones, and the features come back row-major,
the order LFM2-VL's projector reads them in. Padding in transformers' batch is masked out of
attention, so a view's features do not depend on the views padded beside it.

The projector is the core `pixel-shuffle` connector (`norm: post` or `none`, an MLP with
`hidden_size`): LFM2-VL's `pixel_unshuffle` puts a 2x2 block's patches into the channels in
(block row, block column, channel) order and the blocks row-major, which is `pixel_shuffle`'s
layout; its Linear-GELU(erf)-Linear is the `mlp` projector.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.model.vision import VisionTower
from vlmkit.registry import VISION_TOWERS

TOWER = "siglip2-naflex"


class NaFlexTower(VisionTower):
    from_files = False  # built from a config; its weights travel with the checkpoint

    def __init__(self, model: nn.Module, feature_layer: int = -1):
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.patch_size = model.config.patch_size
        # -1: the post-layernormed output (transformers' last_hidden_state); k >= 0: hidden_states[k].
        self.feature_layer = feature_layer

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h*w, p*p*3), each patch flattened (row, column, channel)."""
        n, c, height, width = pixel_values.shape
        p = self.patch_size
        h, w = height // p, width // p
        x = pixel_values[:, :, : h * p, : w * p].reshape(n, c, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, p * p * c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        h, w = self.grid_hw(*pixel_values.shape[-2:])
        patches = self.patches(pixel_values).to(next(self.model.parameters()).dtype)
        mask = torch.ones(n, h * w, dtype=torch.int32, device=pixel_values.device)
        shapes = torch.tensor([[h, w]] * n, dtype=torch.long, device=pixel_values.device)
        want_hidden = self.feature_layer != -1
        out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=want_hidden)
        return out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state


@VISION_TOWERS.register(TOWER)
def build_naflex_tower(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised SigLIP2 NaFlex tower from `cfg.config` (Siglip2VisionConfig fields);
    `vlmkit import-hf` loads the weights into it."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    return NaFlexTower(Siglip2VisionModel(Siglip2VisionConfig(**(cfg.config or {}))), cfg.feature_layer)
