"""Idefics2's vision transformer as a vlmkit tower (`idefics2-vision`): SigLIP's layers with
fractional position ids, so a view of any size (whole patches) keeps its positions spread over
the learned grid."""

from __future__ import annotations

from vlmkit.config import VisionConfig
from vlmkit.model.vision import HFVisionTower, VisionTower
from vlmkit.registry import VISION_TOWERS

TOWER = "idefics2-vision"


@VISION_TOWERS.register(TOWER)
def build_idefics2_tower(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """Idefics2's vision transformer, built from `cfg.config` (an `Idefics2VisionConfig`): SigLIP's
    layers with fractional position ids, so any image size (whole patches) keeps positions
    spread over the learned grid. Its weights are saved with the checkpoint."""
    # transformers is imported when the tower is built, not when vlmkit registers it.
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    tower = HFVisionTower(Idefics2VisionTransformer(Idefics2VisionConfig(**(cfg.config or {}))), cfg.feature_layer)
    tower.from_files = False
    return tower
