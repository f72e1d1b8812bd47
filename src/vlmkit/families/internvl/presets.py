"""InternVL2-Llama3-76B at real shape (with the released 12-tile cap, and with the lecture's 40),
and its tiny CPU variant: InternViT-6B, a 2x2 pixel shuffle with a LayerNorm after the merge and
an MLP, and InternVL's `dynamic` tiling processor."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, tiny, toy
from vlmkit.processing.images import IMAGENET_MEAN, IMAGENET_STD

INTERNVL_SHUFFLE = {"ratio": 0.5, "norm": "post"}
INTERNVL2_76B = {
    "name": "internvl2-76b", "family": "InternVL2-Llama3-76B", "release": "OpenGVLab/InternVL2-Llama3-76B",
    "published": {"total": 76.26e9, "source": "Hugging Face model page OpenGVLab/InternVL2-Llama3-76B (safetensors: 76.3B params)"},
    "vision": {"model_class": "InternVLVisionModel", "config_class": "InternVLVisionConfig",
               "config": {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
                          "image_size": 448, "patch_size": 14, "use_qk_norm": True, "norm_type": "rms_norm", "use_mean_pooling": False,
                          "attention_bias": True}},
    "connector": {"name": "pixel-shuffle", "options": INTERNVL_SHUFFLE},
    "llm": llama(128265, 8192, 28672, 80, 64, 8, label="Hermes-2-Theta-Llama-3-70B", max_position_embeddings=8192),
    "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "per 448 px tile; dynamic tiling uses 1..40 tiles + thumbnail"},
    "processor": processor("dynamic", 448, IMAGENET_MEAN, IMAGENET_STD, max_num=12, downsample_ratio=INTERNVL_SHUFFLE["ratio"]),
    "tokens_note": "max_dynamic_patch 12 (the released config)",
    "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
    "aliases": ["internvl2-llama3-76b"],
    "lecture_figures": {"vision": ("InternViT-6B", 6.0e9)},
}
INTERNVL2_76B["tiny"] = tiny("pixel-shuffle", INTERNVL_SHUFFLE, processor=toy(INTERNVL2_76B["processor"], 32, patch_size=4))

PRESETS = (
    INTERNVL2_76B,
    {
        **INTERNVL2_76B, "name": "internvl2-76b-40tiles", "aliases": [], "family": "InternVL2-Llama3-76B (max_num 40)",
        "image": {**INTERNVL2_76B["image"], "note": "per 448 px tile; dynamic tiling uses 1..40 tiles + thumbnail (here up to 40)"},
        "processor": {**INTERNVL2_76B["processor"], "options": {**INTERNVL2_76B["processor"]["options"], "max_num": 40}},
        "tokens_note": "max_num 40, the lecture's tile cap",
        "tiny": {**INTERNVL2_76B["tiny"], "processor": toy(INTERNVL2_76B["tiny"]["processor"], 32, max_num=40)},
    },
)
