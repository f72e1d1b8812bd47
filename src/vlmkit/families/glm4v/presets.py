"""GLM-4.1V-9B at real shape, and its tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

# Released preprocessor_config: 14 px patches, 2x2 merge, 12544 .. 9633792 pixels (over 2 frames).
GLM4V = processor("glm4v", 448, CLIP_MEAN, CLIP_STD, patch_size=14, merge_size=2, min_pixels=12544, max_pixels=9633792)

GLM4V_VIT = {"model_class": "transformers.models.glm4v.modeling_glm4v:Glm4vVisionModel", "config_class": "Glm4vVisionConfig",
             "config": {"depth": 24, "hidden_size": 1536, "intermediate_size": 13696, "num_heads": 12, "patch_size": 14,
                        "image_size": 336, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 4096},
             # Its downsample and PatchMerger are the `glm4v-merger` connector.
             "drop": ["downsample", "merger"], "output_dim": 1536}

# Toy sizes: 32 px images, 4 px patches (an 8x8 patch grid), so the family trains on CPU.
TINY_GLM4V = {"patch_size": 4, "min_pixels": 16 * 16, "max_pixels": 64 * 64 * 2}
TINY_GLM4V_PARTS = {
    "vision": {"name": "glm4v-vit", "config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                                               "image_size": 24, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64}},
    "connector": {"name": "glm4v-merger", "options": {"hidden_size": 48}},
    "llm": {"name": "glm4v-text-random", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}},
    "fusion": "prefix",
}
TINY_GLM4V_MODEL = {**TINY_GLM4V_PARTS, "processor": toy(GLM4V, 32, **TINY_GLM4V)}

PRESETS = (
    {
        "name": "glm4.1v-9b", "family": "GLM-4.1V-9B", "release": "zai-org/GLM-4.1V-9B-Thinking",
        "published": {"total": 10.29e9, "source": "Hugging Face model page zai-org/GLM-4.1V-9B-Thinking (safetensors: 10.3B params)"},
        "vision": GLM4V_VIT,
        "connector": {"name": "glm4v-merger", "options": {"hidden_size": 13696}},
        "llm": llama(151552, 4096, 13696, 40, 32, 2, cls="Glm4Config", label="GLM-4-9B-0414", head_dim=128, attention_bias=True,
                     partial_rotary_factor=0.5, max_position_embeddings=65536),
        "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "448x448 input; dynamic resolution (smart_resize) changes the grid"},
        "processor": GLM4V, "tokens_note": "released preprocessor_config: shortest_edge 12544, longest_edge 9633792 (over 2 frames)",
        "stages": {"stage1-align": ["vision", "connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": TINY_GLM4V_MODEL,
    },
)
