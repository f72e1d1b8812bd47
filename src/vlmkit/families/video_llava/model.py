"""Video-LLaVA's two towers: an image tower and a separate video tower of the same shape (one
Hugging Face vision config), sharing one projector.

Images go through the image tower with the CLS token dropped (`vision_feature_select_strategy:
default`); video frames (views of role `frame`) through the video tower with every token kept,
CLS first, as `VideoLlavaModel.get_video_features` takes them. The frame's tokens are one row
of `grid + 1` (the CLS token has no place in the 2D grid), which the per-token projector reads
as it reads any row.
"""

from __future__ import annotations

import torch

from vlmkit.config import VisionConfig
from vlmkit.model.vision import HFVisionTower, VisionTower
from vlmkit.registry import VISION_TOWERS


class ImageVideoTowers(VisionTower):
    from_files = False  # built from a config; the weights travel in the checkpoint

    def __init__(self, image: HFVisionTower, video: HFVisionTower):
        super().__init__()
        self.image, self.video = image, video
        self.hidden_size, self.patch_size = image.hidden_size, image.patch_size
        self.feature_layer, self.has_cls = image.feature_layer, image.has_cls

    @property
    def model(self):
        """The image tower's transformers model (what exporters read of a single-tower family)."""
        return self.image.model

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return self.image.grid_hw(height, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image(pixel_values)

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        video = self.video
        out = video.model(pixel_values=pixel_values, output_hidden_states=video.feature_layer != -1)
        return out.hidden_states[video.feature_layer] if video.feature_layer != -1 else out.last_hidden_state

    def frame_grid_hw(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.video.grid_hw(height, width)
        return 1, h * w + int(self.video.has_cls)


@VISION_TOWERS.register("image-video-random")
def build_image_video_towers(cfg: VisionConfig, pretrained: bool = False) -> ImageVideoTowers:
    """Two randomly initialised Hugging Face towers of one config (`model_type`, `config`): the
    image tower and the video tower (Video-LLaVA; import-hf fills their weights)."""
    from transformers import AutoConfig, AutoModel

    hf_cfg = AutoConfig.for_model(cfg.model_type, **(cfg.config or {}))
    return ImageVideoTowers(HFVisionTower(AutoModel.from_config(hf_cfg), cfg.feature_layer),
                            HFVisionTower(AutoModel.from_config(hf_cfg), cfg.feature_layer))
