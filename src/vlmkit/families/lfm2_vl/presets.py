"""LFM2-VL-450M and LFM2-VL-1.6B at real shape, and their tiny CPU variant.

The figures are those of the releases' config.json as this project knows them:
* LFM2-VL-450M (`LiquidAI/LFM2-VL-450M`): vision SigLIP2 NaFlex base (hidden 768, intermediate
  3072, 12 layers, 12 heads, patch 16, a 16x16 position grid), projector hidden 2560 with a
  LayerNorm, downsample 2; text LFM2-350M (vocab 65536, hidden 1024, block_ff_dim 6656
  auto-adjusted to 4608, 16 layers of which 6 attention (2, 5, 8, 10, 12, 14), 16 heads, 8 KV
  heads, tied); processor: 512 px tiles, 64..256 tokens, 2..10 tiles, tolerance 2.0, no thumbnail;
* LFM2-VL-1.6B (`LiquidAI/LFM2-VL-1.6B`): vision SigLIP2 NaFlex shape-optimised 400M with its
  last layer left out (hidden 1152, intermediate 4304, 26 layers, 16 heads, patch 16); text
  LFM2-1.2B (hidden 2048, block_ff_dim 12288 -> 8192, 16 layers, the same 6 attention layers, 32
  heads, 8 KV heads, tied); the same processor with the thumbnail.
"""

from __future__ import annotations

from vlmkit.presets.parts import processor, toy
from vlmkit.processing.images import HALF_MEAN, HALF_STD

ATTENTION_LAYERS = (2, 5, 8, 10, 12, 14)
LAYER_TYPES = ["full_attention" if i in ATTENTION_LAYERS else "conv" for i in range(16)]
CONNECTOR = {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "post", "norm_eps": 1e-5, "projector": "mlp",
                                                   "hidden_size": 2560, "bias": True}}
OPTIONS = {"patch_size": 16, "downsample": 2, "min_image_tokens": 64, "max_image_tokens": 256, "min_tiles": 2, "max_tiles": 10,
           "max_pixels_tolerance": 2.0}


def _vision(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return {"model_class": "Siglip2VisionModel", "config_class": "Siglip2VisionConfig",
            "config": {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "patch_size": 16, "num_patches": 256, "vision_use_head": False}}


def _lfm2(hidden: int, ff: int, heads: int, label: str) -> dict:
    return {"config_class": "Lfm2Config", "label": label,
            "config": {"vocab_size": 65536, "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": 16,
                       "num_attention_heads": heads, "num_key_value_heads": 8, "layer_types": LAYER_TYPES, "tie_word_embeddings": True,
                       "max_position_embeddings": 128000}}


def _tiny(real_processor: dict) -> dict:
    """SigLIP2 NaFlex and LFM2 at toy width (4 px patches, 32 px tiles, 4..16 tokens a view)."""
    return {"vision": {"name": "siglip2-naflex", "config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                                            "num_attention_heads": 4, "patch_size": 4, "num_patches": 16}},
            "connector": {"name": "pixel-shuffle", "options": {**CONNECTOR["options"], "hidden_size": 80}},
            "llm": {"name": "hf-random", "model_type": "lfm2", "config": {
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "layer_types": ["conv", "full_attention", "conv", "full_attention"], "block_multiple_of": 32,
                "max_position_embeddings": 2048}},
            "processor": toy(real_processor, 32, patch_size=4, min_image_tokens=4, max_image_tokens=16, max_tiles=4),
            "fusion": "prefix"}


_STAGES = {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]}
_IMAGE = {"size": 512, "grid": [32, 32], "tiles": 1, "note": "one 512 px view; larger images: 2..10 tiles of 256 tokens (+ thumbnail)"}
PROCESSOR_450M = processor("lfm2_vl", 512, HALF_MEAN, HALF_STD, "bilinear", **OPTIONS, use_thumbnail=False)
PROCESSOR_1_6B = processor("lfm2_vl", 512, HALF_MEAN, HALF_STD, "bilinear", **OPTIONS, use_thumbnail=True)

PRESETS = (
    {
        "name": "lfm2-vl-450m", "family": "LFM2-VL 450M", "release": "LiquidAI/LFM2-VL-450M",
        "published": {"total": 4.5e8, "source": "Liquid AI's model card for LiquidAI/LFM2-VL-450M (450M parameters; as recalled, "
                                                "not re-checked from this offline machine)"},
        "vision": _vision(768, 3072, 12, 12),
        "connector": CONNECTOR,
        "llm": _lfm2(1024, 6656, 16, "LFM2-350M"),
        "image": _IMAGE, "processor": PROCESSOR_450M,
        "tokens_note": "native resolution: 64..256 tokens per view (16 px patches, 2x2 unshuffle); 512 px tiles when larger",
        "stages": _STAGES, "tiny": _tiny(PROCESSOR_450M),
    },
    {
        "name": "lfm2-vl-1.6b", "family": "LFM2-VL 1.6B", "release": "LiquidAI/LFM2-VL-1.6B",
        "published": {"total": 1.58e9, "source": "Hugging Face model page LiquidAI/LFM2-VL-1.6B (safetensors: 1.58B params; "
                                                 "as recalled, not re-checked from this offline machine)"},
        "vision": _vision(1152, 4304, 26, 16),
        "connector": CONNECTOR,
        "llm": _lfm2(2048, 12288, 32, "LFM2-1.2B"),
        "image": _IMAGE, "processor": PROCESSOR_1_6B,
        "tokens_note": "native resolution: 64..256 tokens per view (16 px patches, 2x2 unshuffle); 512 px tiles + thumbnail when larger",
        "stages": _STAGES, "tiny": _tiny(PROCESSOR_1_6B),
    },
)
