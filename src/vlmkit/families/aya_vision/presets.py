"""Aya Vision 8B at real shape, and its tiny CPU variant.

The figures are those of `CohereLabs/aya-vision-8b`'s config.json and processor files as this
project knows them (not re-read from this offline machine):
* vision_config: `siglip_vision_model`, hidden 1152, intermediate 4304, 27 layers, 16 heads,
  patch 14, image_size 364, no head (SigLIP2-so400m's weights at 364 px);
* downsample_factor 2, adapter_layer_norm_eps 1e-6, alignment_intermediate_size 28672;
* text_config: `cohere2` (Command R7B): vocab 256000, hidden 4096, intermediate 14336, 32 layers,
  32 heads, 8 key/value heads, tied embeddings, a 16K context;
* GotOcr2 image processor: 364 px tiles, min_patches 1, max_patches 12, crop_to_patches, mean /
  std 0.5, bicubic; AyaVisionProcessor: img_size 364, patch_size 28 (14 x the downsample factor).
"""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, siglip_so400m, tiny, toy
from vlmkit.processing.images import HALF_MEAN, HALF_STD

AYA_SHUFFLE = {"ratio": 0.5, "norm_eps": 1e-6, "hidden_size": 28672}
AYA_PROCESSOR = processor("aya_vision", 364, HALF_MEAN, HALF_STD, patch_size=14, downsample_ratio=AYA_SHUFFLE["ratio"], max_num=12)

PRESETS = (
    {
        "name": "aya-vision-8b", "family": "Aya Vision 8B", "release": "CohereLabs/aya-vision-8b",
        "published": {"total": 8.63e9, "source": "Hugging Face model page CohereLabs/aya-vision-8b (safetensors: 8.63B params; "
                                                  "as recalled, not re-checked from this offline machine)"},
        "vision": siglip_so400m(364),
        "connector": {"name": "pixel-shuffle-swiglu", "options": AYA_SHUFFLE},
        "llm": llama(256000, 4096, 14336, 32, 32, 8, tie=True, cls="Cohere2Config", label="Command R7B (Cohere2)",
                     max_position_embeddings=16384),
        "image": {"size": 364, "grid": [26, 26], "tiles": 1, "note": "per 364 px tile; GotOcr2 tiling uses 1..12 tiles + a thumbnail"},
        "processor": AYA_PROCESSOR, "tokens_note": "364 px tiles, 169 tokens each; max_patches 12 (the released preprocessor config)",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle-swiglu", {"ratio": 0.5, "norm_eps": 1e-6}, processor=toy(AYA_PROCESSOR, 32, patch_size=4, max_num=6)),
    },
)
