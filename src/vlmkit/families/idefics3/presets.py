"""Idefics3-8B at real shape, and its tiny CPU variant; `idefics3_like`, the shape of every
Idefics3-style preset (SmolVLM's too)."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, siglip_so400m, tiny, toy
from vlmkit.processing.images import HALF_MEAN, HALF_STD


def idefics3_like(scale: int, crop: int, patch: int, longest_edge: int, tiny_size: int) -> tuple[dict, dict, dict]:
    """Connector options, processor and tiny processor of an Idefics3-style model: the
    processor's scale factor is the connector's pixel-shuffle factor, stated once."""
    connector = {"ratio": 1 / scale, "norm": "none", "projector": "linear", "bias": False}
    real = processor("idefics3", crop, HALF_MEAN, HALF_STD, longest_edge=longest_edge, patch_size=patch, scale_factor=scale)
    return connector, real, toy(real, tiny_size, longest_edge=4 * tiny_size, patch_size=4)


IDEFICS3_SHUFFLE, IDEFICS3_PROC, IDEFICS3_TINY = idefics3_like(2, 364, 14, 4 * 364, 32)

PRESETS = (
    {
        "name": "idefics3-8b", "family": "Idefics3-8B-Llama3", "release": "HuggingFaceM4/Idefics3-8B-Llama3",
        "published": {"total": 8.46e9, "source": "Hugging Face model page HuggingFaceM4/Idefics3-8B-Llama3 (safetensors: 8.46B params)"},
        "vision": siglip_so400m(364),
        "connector": {"name": "pixel-shuffle", "options": IDEFICS3_SHUFFLE},
        "llm": llama(128259, 4096, 14336, 32, 32, 8, label="Llama-3.1-8B", max_position_embeddings=131072),
        "image": {"size": 364, "grid": [26, 26], "tiles": 1, "note": "per 364 px split; image splitting adds splits + a global view"},
        "processor": IDEFICS3_PROC, "tokens_note": "364 px crops, 169 tokens each",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", IDEFICS3_SHUFFLE, processor=IDEFICS3_TINY),
    },
)
