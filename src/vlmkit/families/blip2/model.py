"""BLIP-2 / InstructBLIP's vision transformer, from transformers, as a vlmkit tower.

`Blip2VisionModel` (and InstructBLIP's identical `InstructBlipVisionModel`) are not reachable
through `AutoModel`, so `hf-random` cannot build them. The tower is built from its config (the
weights come from the checkpoint, as for `hf-random`) and returns every token of the last layer
after the post-LayerNorm, the CLS token included: the Q-Former cross-attends to all of them.
"""

from __future__ import annotations

from vlmkit.config import VisionConfig
from vlmkit.model.vision import HFVisionTower, VisionTower
from vlmkit.registry import VISION_TOWERS


def _classes() -> dict[str, type]:
    from transformers import Blip2VisionModel, InstructBlipVisionModel

    return {"blip_2_vision_model": Blip2VisionModel, "instructblip_vision_model": InstructBlipVisionModel}


@VISION_TOWERS.register("hf-blip")
def build_blip_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    from transformers import AutoConfig

    model_type = cfg.model_type or "blip_2_vision_model"
    classes = _classes()
    if model_type not in classes:
        raise ValueError(f"vision tower 'hf-blip': model_type {model_type!r} is not one of {sorted(classes)}")
    if cfg.feature_layer != -1:
        raise ValueError("vision tower 'hf-blip' reads the last layer (after the post-LayerNorm): feature_layer must be -1")
    hf_cfg = AutoConfig.for_model(model_type, **(cfg.config or {}))
    tower = HFVisionTower(classes[model_type](hf_cfg).eval(), -1)
    # Built from a config, never from files: checkpoints carry its weights.
    tower.from_files = False
    return tower
