"""Llama 3.2 Vision 11B and 90B at real shape, and their tiny CPU variants."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, tiny, toy
from vlmkit.processing.images import HALF_MEAN, HALF_STD

MLLAMA_VIT = {"model_class": "MllamaVisionModel", "config_class": "MllamaVisionConfig", "config": {},
              # Final layer + 4 intermediate layers, concatenated: 5 x 1280.
              "output_dim": 7680}
LLAMA31_8B = llama(128256, 4096, 14336, 32, 32, 8, label="Llama-3.1-8B", max_position_embeddings=131072)
LLAMA3_70B = llama(128256, 8192, 28672, 80, 64, 8, label="Llama-3.1-70B", max_position_embeddings=131072)
MLLAMA_XATTN = {"heads": 32, "kv_heads": 8, "ffn": "swiglu", "ffn_hidden": 14336, "norm": "rmsnorm", "qk_norm": True, "every": 4}
MLLAMA = processor("mllama", 560, HALF_MEAN, HALF_STD, resample="bilinear", max_tiles=4)

PRESETS = tuple(
    {
        "name": f"llama-3.2-vision-{size}", "family": f"Llama 3.2 Vision {size.upper()}", "release": f"meta-llama/Llama-3.2-{size.upper()}-Vision",
        "published": {"total": total, "source": f"Meta model card Llama-3.2-{size.upper()}-Vision ({total / 1e9:.2f}B params)"},
        "lecture_figures": {"vision": ("ViT-H (630M)", 630e6)},
        "vision": MLLAMA_VIT, "connector": {"name": "linear", "options": {}},
        "cross_attention": xattn, "fusion": "cross-attention",
        "llm": llm,
        # 4 tiles of 560 px, 40x40 patches + CLS each (the CLS is not a grid token; noted below).
        "image": {"size": 560, "grid": [40, 40], "tiles": 4, "extra_tokens": 4, "note": "4 tiles x (1600 patches + CLS) of cross-attention memory"},
        "processor": MLLAMA, "tokens_note": "cross-attention: 1 sequence token per image",
        "stages": {"stage1-align": ["vision", "connector", "cross_attention"], "stage2-instruct": ["vision", "connector", "cross_attention", "llm"]},
        "tiny": tiny("linear", {"cross_attention": {"every": 1, "heads": 4, "kv_heads": 2, "ffn": "swiglu", "norm": "rmsnorm", "qk_norm": True}},
                     fusion="cross-attention", processor=toy(MLLAMA, 32, patch_size=4)),
    }
    for size, total, llm, xattn in (
        ("11b", 10.67e9, LLAMA31_8B, MLLAMA_XATTN),
        ("90b", 88.6e9, LLAMA3_70B, {**MLLAMA_XATTN, "heads": 64, "ffn_hidden": 28672}),
    )
)
