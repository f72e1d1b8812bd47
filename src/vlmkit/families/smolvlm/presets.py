"""SmolVLM-Instruct (2B) and SmolVLM-256M at real shape, and their tiny CPU variants: Idefics3's
shape (`idefics3_like`) at SmolVLM's crop sizes and pixel-shuffle factors."""

from __future__ import annotations

from vlmkit.families.idefics3.presets import idefics3_like
from vlmkit.presets.parts import llama, siglip_so400m, tiny

SMOLVLM_SHUFFLE, SMOLVLM_PROC, SMOLVLM_TINY = idefics3_like(3, 384, 14, 1536, 24)
SMOLVLM_256M_SHUFFLE, SMOLVLM_256M_PROC, SMOLVLM_256M_TINY = idefics3_like(4, 512, 16, 2048, 32)

PRESETS = (
    {
        "name": "smolvlm", "family": "SmolVLM-Instruct (2B)", "release": "HuggingFaceTB/SmolVLM-Instruct",
        "aliases": ["smolvlm-instruct", "smolvlm-2b"],
        "published": {"total": 2.25e9, "source": "Hugging Face model page HuggingFaceTB/SmolVLM-Instruct (safetensors: 2.25B params)"},
        "vision": siglip_so400m(384),
        "connector": {"name": "pixel-shuffle", "options": SMOLVLM_SHUFFLE},
        "llm": llama(49155, 2048, 8192, 24, 32, 32, tie=False, label="SmolLM2-1.7B", max_position_embeddings=16384),
        "image": {"size": 384, "grid": [27, 27], "tiles": 1, "note": "per 384 px split; image splitting adds splits + a global view"},
        "processor": SMOLVLM_PROC, "tokens_note": "SmolVLM-Instruct: 384 px crops, 81 tokens each",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", SMOLVLM_SHUFFLE, processor=SMOLVLM_TINY),
    },
    {
        "name": "smolvlm-256m", "family": "SmolVLM-256M-Instruct", "release": "HuggingFaceTB/SmolVLM-256M-Instruct",
        "published": {"total": 256e6, "source": "Hugging Face blog 'SmolVLM Grows Smaller' (256M parameters); safetensors total not checked from this offline machine"},
        "vision": {"model_class": "SiglipVisionModel", "config_class": "SiglipVisionConfig",
                   "config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "image_size": 512, "patch_size": 16, "vision_use_head": False}},
        "connector": {"name": "pixel-shuffle", "options": SMOLVLM_256M_SHUFFLE},
        # The LM head is stored apart from the embeddings here (tied, the count would be 228M, not 256M).
        "llm": llama(49280, 576, 1536, 30, 9, 3, tie=False, label="SmolLM2-135M", max_position_embeddings=8192),
        "image": {"size": 512, "grid": [32, 32], "tiles": 1, "note": "per 512 px split; image splitting adds splits + a global view"},
        "processor": SMOLVLM_256M_PROC, "tokens_note": "512 px crops, 64 tokens each",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", SMOLVLM_256M_SHUFFLE, processor=SMOLVLM_256M_TINY),
    },
)
