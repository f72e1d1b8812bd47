"""Command A Vision (Cohere2-Vision, 112B) at real shape, and its tiny CPU variant.

The figures are those of `CohereLabs/command-a-vision-07-2025`'s config.json and processor files
as this project knows them (not re-read from this offline machine):
* vision_config: `siglip_vision_model`, hidden 1152, intermediate 4304, 27 layers, 16 heads,
  patch 16, image_size 512 (SigLIP2-so400m at 512 px);
* downsample_factor 2, alignment_intermediate_size 36864;
* text_config: `cohere2` (Command A): vocab 256000, hidden 12288, intermediate 36864, 64 layers,
  96 heads, 8 key/value heads, tied embeddings;
* image processor: 512 px tiles, max_patches 12, a thumbnail; 256 tokens a tile.
"""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, siglip_so400m, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

SHUFFLE = {"ratio": 0.5, "layernorm": False, "hidden_size": 36864}
PROCESSOR = processor("cohere2_vision", 512, CLIP_MEAN, CLIP_STD, patch_size=16, downsample_ratio=SHUFFLE["ratio"], max_num=12)

PRESETS = (
    {
        "name": "command-a-vision", "aliases": ["command-a-vision-07-2025", "cohere2-vision-112b"],
        "family": "Cohere2-Vision (Command A Vision)", "release": "CohereLabs/command-a-vision-07-2025",
        "published": {"total": 112e9, "source": "Hugging Face model card CohereLabs/command-a-vision-07-2025 (112B parameters; "
                                                 "as recalled, not re-checked from this offline machine)"},
        "vision": {**siglip_so400m(512), "config": {**siglip_so400m(512)["config"], "patch_size": 16}},
        "connector": {"name": "pixel-shuffle-swiglu", "options": SHUFFLE},
        "llm": llama(256000, 12288, 36864, 64, 96, 8, tie=True, cls="Cohere2Config", label="Command A (Cohere2)",
                     max_position_embeddings=32768),
        "image": {"size": 512, "grid": [32, 32], "tiles": 1, "note": "per 512 px tile; 1..12 tiles + a thumbnail, a line break after each"},
        "processor": PROCESSOR, "tokens_note": "512 px tiles, 256 tokens each; max_patches 12",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle-swiglu", {"ratio": 0.5, "layernorm": False}, processor=toy(PROCESSOR, 32, patch_size=4, max_num=4)),
    },
)
