"""LLaVA-NeXT (v1.6; Mistral-7B and Vicuna-7B) at real shape, and the lecture's AnyRes
illustration (`anyres-seed`, `anyres-seed-shuffle`: not released models), with their tiny CPU
variants. All use the core's `anyres` processor."""

from __future__ import annotations

from typing import Any

from vlmkit.families.llava.presets import LLAVA_STAGES
from vlmkit.presets.parts import CLIP_L_336, VICUNA_7B, llama, processor, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

LLAVA_NEXT = processor("anyres", 336, CLIP_MEAN, CLIP_STD)
# Toy sizes: 32 px tiles, 4 px patches (an 8x8 feature grid per tile).
TINY_ANYRES = {"patch_size": 4, "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}

# The lecture's AnyRes example: 448 px tiles on the LLaVA-NeXT recipe, a 224 px global view,
# no unpadding or row newlines; the "-shuffle" variant adds InternVL's 2x2 pixel shuffle.
SEED_PINPOINTS = [[448, 896], [896, 448], [896, 896], [1344, 448], [448, 1344], [896, 1344], [1344, 896]]
SEED_SHUFFLE = {"ratio": 0.5, "norm": "post"}


def anyres_seed(name: str, connector: dict, pixel_shuffle: int, note: str) -> dict[str, Any]:
    real = processor("anyres", 448, CLIP_MEAN, CLIP_STD, grid_pinpoints=SEED_PINPOINTS, unpad=False, newline=False,
                     base_size=224, pixel_shuffle=pixel_shuffle)
    return {
        "name": name, "family": "AnyRes (the lecture's example)", "release": "none (an illustration, not a released model)",
        "published": {"total": None, "source": "not a released model: CLIP ViT-L/14 at 448 px + Vicuna-7B, the lecture's AnyRes example"},
        "vision": {**CLIP_L_336, "config": {**CLIP_L_336["config"], "image_size": 448}},
        "connector": connector, "llm": VICUNA_7B,
        "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "per 448 px tile; AnyRes adds tiles + a 224 px global view (vlmkit tokens)"},
        "processor": real, "tokens_note": note,
        "stages": LLAVA_STAGES,
        # The anyres family makes pixels only with the global view at tile size (a smaller global
        # view is token-only there), so the tiny variant, which trains, keeps base_size = tile size.
        "tiny": tiny(connector["name"], connector["options"], vision="clip",
                     processor=toy(real, 32, patch_size=4, base_size=None, grid_pinpoints=TINY_ANYRES["grid_pinpoints"])),
    }


PRESETS = (
    {
        "name": "llava-next", "aliases": ["llava-v1.6-mistral-7b", "llava-next-mistral-7b"],
        "family": "LLaVA-NeXT (v1.6, Mistral-7B)", "release": "llava-hf/llava-v1.6-mistral-7b-hf",
        "published": {"total": 7.57e9, "source": "Hugging Face model page llava-hf/llava-v1.6-mistral-7b-hf (safetensors: 7.57B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 4096, 14336, 32, 32, 8, cls="MistralConfig", label="Mistral-7B-Instruct-v0.2", max_position_embeddings=32768),
        # The learned row-newline embedding appended after each unpadded feature row.
        "extra_params": {"connector": 4096},
        "image": {"size": 336, "grid": [24, 24], "tiles": 1, "note": "per 336 px tile; AnyRes adds tiles + newline tokens (vlmkit tokens)"},
        "processor": LLAVA_NEXT, "tokens_note": "llava-v1.6 pinpoints, 336 px tiles",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", llm="mistral", processor=toy(LLAVA_NEXT, 32, **TINY_ANYRES)),
    },
    {
        # The same image path as llava-next with the Vicuna-7B language model (`vlmkit tokens`' first LLaVA-NeXT).
        "name": "llava-next-7b", "aliases": ["llava-v1.6-vicuna-7b", "llava-next-vicuna-7b"],
        "family": "LLaVA-NeXT (v1.6, Vicuna-7B)", "release": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "published": {"total": None, "source": "llava-hf/llava-v1.6-vicuna-7b-hf: no total written down (not checked from this offline machine)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": VICUNA_7B,
        "extra_params": {"connector": 4096},
        "image": {"size": 336, "grid": [24, 24], "tiles": 1, "note": "per 336 px tile; AnyRes adds tiles + newline tokens (vlmkit tokens)"},
        "processor": LLAVA_NEXT, "tokens_note": "llava-v1.6 pinpoints, 336 px tiles",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(LLAVA_NEXT, 32, **TINY_ANYRES)),
    },
    anyres_seed("anyres-seed", {"name": "mlp", "options": {}}, 1,
                "the lecture's AnyRes example: 448 px tiles (1024 tokens) + 224 px global (256)"),
    anyres_seed("anyres-seed-shuffle", {"name": "pixel-shuffle", "options": SEED_SHUFFLE}, round(1 / SEED_SHUFFLE["ratio"]),
                "the same with a 2x2 pixel shuffle (InternVL-style, 1/4 of the tokens)"),
)
