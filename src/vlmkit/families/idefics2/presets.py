"""Idefics2-8B at real shape, and its tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, siglip_so400m, tiny
from vlmkit.processing.images import HALF_MEAN, HALF_STD

PRESETS = (
    {
        "name": "idefics2", "family": "Idefics2-8B", "release": "HuggingFaceM4/idefics2-8b",
        "published": {"total": 8.40e9, "source": "Hugging Face model page HuggingFaceM4/idefics2-8b (safetensors: 8.4B params)"},
        "vision": siglip_so400m(980),
        "connector": {"name": "perceiver", "options": {"latents": 64, "layers": 3, "heads": 16, "head_dim": 96, "kv_heads": 4, "width": 4096,
                                                        "ffn": "swiglu", "norm": "rmsnorm", "norm_eps": 1e-6, "input_proj": "swiglu",
                                                        "input_proj_hidden": 14336, "project_output": False}},
        "llm": llama(32003, 4096, 14336, 32, 32, 8, cls="MistralConfig", label="Mistral-7B-v0.1", max_position_embeddings=32768),
        "image": {"size": 980, "grid": [70, 70], "tiles": 1},
        # Idefics2 keeps the aspect ratio (longest edge 980) and pads; image splitting is off by
        # default. The count is the Perceiver's, whatever the size.
        "processor": processor("fixed", 980, HALF_MEAN, HALF_STD),
        "tokens_note": "64 Perceiver latents per image (image splitting off, the released default)",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("perceiver", {"latents": 8, "layers": 1, "heads": 4, "head_dim": 16, "kv_heads": 2, "width": 64, "ffn": "swiglu",
                                    "norm": "rmsnorm", "input_proj": "swiglu", "project_output": False}, llm="mistral",
                     processor=processor("fixed", 32, HALF_MEAN, HALF_STD)),
    },
)
