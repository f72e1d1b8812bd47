"""LLaVA-1.5 (7B, 13B) at real shape, and their tiny CPU variants: a CLIP ViT-L/14 at 336 px, the
2-layer GELU MLP, the Vicuna LLM, and the core's fixed-resolution processor (LLaVA-1.5 pads the
image to a square with the mean colour)."""

from __future__ import annotations

from vlmkit.presets.parts import CLIP_L_336, VICUNA_7B, llama, processor, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

CLIP_336 = processor("fixed", 336, CLIP_MEAN, CLIP_STD)
# LLaVA's two stages: align the projector on captions, then instruction-tune projector and LLM.
LLAVA_STAGES = {"stage1-align": ["connector"], "stage2-instruct": ["connector", "llm"]}

PRESETS = (
    {
        "name": "llava-1.5-7b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-7b-hf",
        "published": {"total": 7.06e9, "source": "Hugging Face model page llava-hf/llava-1.5-7b-hf (safetensors: 7.06B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": VICUNA_7B,
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "processor": CLIP_336, "tokens_note": "336 px, 24x24 patches",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(CLIP_336, 32)),
        "lecture_figures": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
    },
    {
        "name": "llava-1.5-13b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-13b-hf",
        "published": {"total": 13.35e9, "source": "Hugging Face model page llava-hf/llava-1.5-13b-hf (safetensors: 13.4B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 5120, 13824, 40, 40, 40, label="Vicuna-13B (Llama-2-13B)", max_position_embeddings=4096),
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "processor": CLIP_336, "tokens_note": "336 px, 24x24 patches",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(CLIP_336, 32)),
        "lecture_figures": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
    },
)
