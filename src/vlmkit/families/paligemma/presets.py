"""PaliGemma-3B (224) at real shape, and its tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, siglip_so400m, tiny
from vlmkit.processing.images import HALF_MEAN, HALF_STD

PRESETS = (
    {
        "name": "paligemma", "family": "PaliGemma-3B (224)", "release": "google/paligemma-3b-pt-224",
        "aliases": ["paligemma-3b"],
        "published": {"total": 2.92e9, "source": "Hugging Face model page google/paligemma-3b-pt-224 (safetensors: 2.92B params)"},
        "vision": siglip_so400m(224), "connector": {"name": "linear", "options": {}},
        "llm": llama(257216, 2048, 16384, 18, 8, 1, tie=True, cls="GemmaConfig", label="Gemma-2B", head_dim=256),
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        # PaliGemma resizes to 224x224 without keeping the aspect ratio.
        "processor": processor("fixed", 224, HALF_MEAN, HALF_STD, fit="squash"), "tokens_note": "224 px, 16x16 patches",
        "stages": {"stage1-pretrain": ["vision", "connector", "llm"]},
        "tiny": tiny("linear", llm="gemma", processor=processor("fixed", 32, HALF_MEAN, HALF_STD, fit="squash")),
    },
)
