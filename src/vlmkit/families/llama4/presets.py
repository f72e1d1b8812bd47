"""Llama 4 Scout and Maverick at real shape, and their tiny CPU variant.

The figures are those of the releases' config.json as this project knows them (not re-read from
this offline machine):
* vision (both): hidden 1408, intermediate 5632, 34 layers, 16 heads, 336 px, patch 14, pixel
  shuffle 0.5 into a 4096-wide adapter (projector_input_dim = projector_output_dim =
  vision_output_dim = 4096); a bias-free linear projector to the text width;
* text (both): vocab 202048, hidden 5120, 48 layers, 40 heads, 8 KV heads, head_dim 128, experts of
  intermediate 8192 with a shared expert, top-1 routing, dense layers of intermediate_size_mlp
  16384, chunked attention of 8192 tokens on three of every four layers (the fourth has no RoPE);
  Scout (`meta-llama/Llama-4-Scout-17B-16E-Instruct`): 16 experts on every layer;
  Maverick (`meta-llama/Llama-4-Maverick-17B-128E-Instruct`): 128 experts on every second layer;
* Llama4ImageProcessor: 336 px tiles, max_patches 16, mean / std 0.5, bilinear.
"""

from __future__ import annotations

from vlmkit.presets.parts import processor, toy
from vlmkit.processing.images import HALF_MEAN, HALF_STD

VISION = {"model_class": "Llama4VisionModel", "config_class": "Llama4VisionConfig", "output_dim": 4096,
          "config": {"hidden_size": 1408, "intermediate_size": 5632, "num_hidden_layers": 34, "num_attention_heads": 16,
                     "image_size": 336, "patch_size": 14, "vision_output_dim": 4096, "projector_input_dim": 4096,
                     "projector_output_dim": 4096, "pixel_shuffle_ratio": 0.5}}
PROCESSOR = processor("llama4", 336, HALF_MEAN, HALF_STD, "bilinear", patch_size=14, pixel_shuffle_ratio=0.5, max_patches=16)


def _text(experts: int, step: int, label: str) -> dict:
    return {"config_class": "Llama4TextConfig", "label": label,
            "config": {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                       "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                       "num_local_experts": experts, "num_experts_per_tok": 1, "interleave_moe_layer_step": step,
                       "attention_chunk_size": 8192, "max_position_embeddings": 10485760, "tie_word_embeddings": False}}


TINY = {"vision": {"name": "llama4-vit", "config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                    "intermediate_size": 192, "image_size": 32, "patch_size": 4,
                                                    "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64,
                                                    "pixel_shuffle_ratio": 0.5}},
        "connector": {"name": "linear", "options": {"bias": False}},
        "llm": {"name": "llama4-text-random", "config": {
            "hidden_size": 64, "intermediate_size": 64, "intermediate_size_mlp": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
            "attention_chunk_size": 64, "max_position_embeddings": 2048}},
        "processor": toy(PROCESSOR, 32, patch_size=4, max_patches=4), "image_token": "<|patch|>", "fusion": "prefix"}
_IMAGE = {"size": 336, "grid": [12, 12], "tiles": 1, "note": "per 336 px tile (144 tokens); 1..16 tiles + a global tile"}
_STAGES = {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]}

PRESETS = (
    {
        "name": "llama4-scout", "family": "Llama 4 Scout 17B-16E", "release": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
        "aliases": ["llama-4-scout-17b-16e"],
        "published": {"total": 109e9, "source": "Meta's Llama 4 model card (Scout: 17B active, 109B total parameters; as recalled, "
                                                "not re-checked from this offline machine)"},
        "vision": VISION, "connector": {"name": "linear", "options": {"bias": False}},
        "llm": _text(16, 1, "Llama 4 Scout text (16 experts)"),
        "image": _IMAGE, "processor": PROCESSOR, "tokens_note": "336 px tiles, 144 tokens each; max_patches 16 + a global tile",
        "stages": _STAGES, "tiny": TINY,
    },
    {
        "name": "llama4-maverick", "family": "Llama 4 Maverick 17B-128E", "release": "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
        "aliases": ["llama-4-maverick-17b-128e"],
        "published": {"total": 400e9, "source": "Meta's Llama 4 model card (Maverick: 17B active, 400B total parameters; as "
                                                "recalled, not re-checked from this offline machine)"},
        "vision": VISION, "connector": {"name": "linear", "options": {"bias": False}},
        "llm": _text(128, 2, "Llama 4 Maverick text (128 experts)"),
        "image": _IMAGE, "processor": PROCESSOR, "tokens_note": "336 px tiles, 144 tokens each; max_patches 16 + a global tile",
        "stages": _STAGES, "tiny": TINY,
    },
)
