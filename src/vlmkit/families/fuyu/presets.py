"""Fuyu-8B at real shape, and its tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import processor, tiny
from vlmkit.processing.images import HALF_MEAN, HALF_STD

PRESETS = (
    {
        "name": "fuyu-8b", "family": "Fuyu-8B", "release": "adept/fuyu-8b",
        "published": {"total": 9.41e9, "source": "Hugging Face model page adept/fuyu-8b (safetensors: 9.41B params)"},
        "vision": {"kind": "patchify", "config": {"patch_size": 30}}, "connector": {"name": "patch-embed", "options": {}},
        "llm": {"config_class": "PersimmonConfig", "label": "Persimmon-8B",
                "config": {"vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 16384,
                           "num_hidden_layers": 36, "num_attention_heads": 64, "tie_word_embeddings": False}},
        "image": {"size": 1080, "grid": [36, 36], "tiles": 1, "note": "1080x1080 input; 30 px patches plus one newline token per row"},
        # Native resolution in 30 px patches with one newline per patch row: the pixtral family's
        # layout (its [IMG_BREAK]s and [IMG_END] are Fuyu's row newlines).
        "processor": processor("pixtral", 1080, HALF_MEAN, HALF_STD, patch_size=30),
        "tokens_note": "30 px patches + 1 newline per row; longest edge capped at 1080 (Fuyu itself fits 1080 high x 1920 wide)",
        "stages": {"stage1-pretrain": ["connector", "llm"]},
        "tiny": tiny("patch-embed", vision="patchify", processor=processor("pixtral", 32, HALF_MEAN, HALF_STD, patch_size=4)),
    },
)
