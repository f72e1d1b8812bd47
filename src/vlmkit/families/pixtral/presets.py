"""Pixtral-12B at real shape, and its tiny CPU variant: the 2D-RoPE native-resolution ViT
(`rope-vit`, this folder), the `native` connector, Mistral-NeMo, and the `pixtral` processor."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, tiny
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

PRESETS = (
    {
        "name": "pixtral-12b", "family": "Pixtral-12B", "release": "mistral-community/pixtral-12b",
        "published": {"total": 12.7e9, "source": "Hugging Face model page mistral-community/pixtral-12b (safetensors: 12.7B params)"},
        "vision": {"kind": "rope-vit", "config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 16}},
        "connector": {"name": "native", "options": {"projector": "mlp"}},
        "llm": llama(131072, 5120, 14336, 40, 32, 8, cls="MistralConfig", label="Mistral-NeMo-12B", head_dim=128),
        "image": {"size": 1024, "grid": [64, 64], "tiles": 1, "note": "1024x1024 input; any size up to 1024 per side, plus one [IMG_BREAK] per row"},
        "processor": processor("pixtral", 1024, CLIP_MEAN, CLIP_STD, patch_size=16), "tokens_note": "longest edge 1024, patch 16",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("native", {"projector": "mlp"}, vision="rope-vit", llm="mistral",
                     processor=processor("pixtral", 32, CLIP_MEAN, CLIP_STD, patch_size=4)),
        "lecture_figures": {"vision": ("Pixtral-ViT-400M", 400e6)},
    },
)
