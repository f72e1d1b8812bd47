"""OpenFlamingo-9B at real shape, and its tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import CLIP_L_336, processor, tiny
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

CLIP_L_224 = {**CLIP_L_336, "config": {**CLIP_L_336["config"], "image_size": 224}}

PRESETS = (
    {
        "name": "openflamingo", "family": "OpenFlamingo-9B (MPT-7B)", "release": "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        "published": {"total": None, "source": "no parameter total is published (the '9B' is a name); see docs/presets.md"},
        "vision": CLIP_L_224,
        "connector": {"name": "perceiver", "options": {"latents": 64, "layers": 6, "heads": 8, "head_dim": 64, "project_output": False, "output": "memory"}},
        "cross_attention": {"every": 4, "heads": 8, "head_dim": 64, "ffn": "gelu", "norm": "layernorm", "layers_path": "transformer.blocks"},
        "fusion": "cross-attention",
        "llm": {"config_class": "MptConfig", "label": "MPT-7B",
                "config": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "vocab_size": 50432, "max_seq_len": 2048}},
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        # CLIP's own preprocessing: short side to 224, centre crop.
        "processor": processor("fixed", 224, CLIP_MEAN, CLIP_STD, fit="crop"),
        "tokens_note": "cross-attention: 64 Perceiver latents per image, 1 sequence token",
        "stages": {"stage1-align": ["connector", "cross_attention"]},
        "tiny": tiny("perceiver", {"latents": 8, "layers": 1, "heads": 4, "head_dim": 12, "project_output": False, "output": "memory",
                                    "cross_attention": {"every": 1, "heads": 4}}, fusion="cross-attention", vision="clip",
                     processor=processor("fixed", 32, CLIP_MEAN, CLIP_STD, fit="crop")),
    },
)
