"""BLIP-2 (OPT-2.7B) and InstructBLIP (Vicuna-7B) at real shape, and their tiny CPU variants."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

EVA_G = {"model_class": "Blip2VisionModel", "config_class": "Blip2VisionConfig",
         "config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14}}
BLIP_224 = processor("fixed", 224, CLIP_MEAN, CLIP_STD)
TINY_QFORMER = {"num_queries": 8, "hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64}

PRESETS = (
    {
        "name": "blip2", "family": "BLIP-2 (OPT-2.7B)", "release": "Salesforce/blip2-opt-2.7b",
        "aliases": ["blip2-opt-2.7b"],
        "published": {"total": 3.74e9, "source": "Hugging Face model page Salesforce/blip2-opt-2.7b (safetensors: 3.74B params)"},
        "vision": EVA_G, "connector": {"name": "qformer", "options": {"num_queries": 32}},
        "llm": {"config_class": "OPTConfig", "label": "OPT-2.7B",
                "config": {"vocab_size": 50304, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "word_embed_proj_dim": 2560, "max_position_embeddings": 2048}},
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "processor": BLIP_224, "tokens_note": "32 learned queries, whatever the image",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["connector"]},
        "tiny": tiny("qformer", TINY_QFORMER, processor=toy(BLIP_224, 32)),
    },
    {
        "name": "instructblip", "family": "InstructBLIP (Vicuna-7B)", "release": "Salesforce/instructblip-vicuna-7b",
        "published": {"total": 7.91e9, "source": "Hugging Face model page Salesforce/instructblip-vicuna-7b (safetensors: 7.91B params)"},
        "vision": EVA_G, "connector": {"name": "qformer", "options": {"num_queries": 32, "text_vocab": 30523, "max_text_positions": 512, "text_ffn": True}},
        # Vicuna v1.1 is LLaMA-1 based: a 2048-token context (LlamaConfig's default).
        "llm": llama(32001, 4096, 11008, 32, 32, 32, label="Vicuna-7B v1.1 (LLaMA-7B)"),
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "processor": BLIP_224, "tokens_note": "32 learned queries, whatever the image",
        "stages": {"stage1-instruct": ["connector"]},
        "tiny": tiny("qformer", TINY_QFORMER, processor=toy(BLIP_224, 32)),
    },
)
