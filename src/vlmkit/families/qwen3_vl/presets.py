"""Qwen3-VL 2B / 4B / 8B / 32B (dense) and 30B-A3B / 235B-A22B (mixture of experts) at real
shape, and their tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, toy

QWEN3_VL_MEAN = QWEN3_VL_STD = (0.5, 0.5, 0.5)
# Released preprocessor_config: 16 px patches, 2x2 merge, 65536 .. 16777216 pixels.
QWEN3_VL = processor("qwen3vl", 512, QWEN3_VL_MEAN, QWEN3_VL_STD, patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)


def qwen3_vit(depth: int, hidden: int, inter: int, deepstack: list[int], out: int) -> dict:
    """The ViT without its mergers (the `qwen3-vl-merger` connector's): its features leave as
    the last layer's and each DeepStack layer's side by side."""
    return {"model_class": "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel", "config_class": "Qwen3VLVisionConfig",
            "config": {"depth": depth, "hidden_size": hidden, "intermediate_size": inter, "num_heads": 16, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                       "deepstack_visual_indexes": deepstack, "out_hidden_size": out},
            "drop": ["merger", "deepstack_merger_list"], "output_dim": hidden * (1 + len(deepstack))}


# Toy sizes: 32 px images, 4 px patches (an 8x8 feature grid), one DeepStack level, so the family trains on CPU.
TINY_QWEN3_VL = {"patch_size": 4, "min_pixels": 16 * 16, "max_pixels": 64 * 64}
TINY_QWEN3_VL_PARTS = {
    "vision": {"name": "qwen3-vit", "config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
                                               "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 16,
                                               "deepstack_visual_indexes": [0], "out_hidden_size": 64}},
    "connector": {"name": "qwen3-vl-merger", "options": {"ratio": 0.5, "levels": 1, "hidden_size": 128}},
    "llm": {"name": "qwen3-vl-text-random", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                                       "max_position_embeddings": 4096}},
    "fusion": "prefix",
}
TINY_QWEN3_VL_MODEL = {**TINY_QWEN3_VL_PARTS, "processor": toy(QWEN3_VL, 32, **TINY_QWEN3_VL)}


def _qwen3(vocab_hidden_inter_layers_heads, tie: bool, label: str) -> dict:
    hidden, inter, layers, heads = vocab_hidden_inter_layers_heads
    return llama(151936, hidden, inter, layers, heads, 8, tie=tie, cls="Qwen3Config", label=label, head_dim=128,
                 max_position_embeddings=262144)


PRESETS = tuple(
    {
        "name": f"qwen3-vl-{size}", "family": f"Qwen3-VL-{size.upper()}", "release": f"Qwen/Qwen3-VL-{size.upper()}-Instruct",
        "published": {"total": total, "source": f"Hugging Face model page Qwen/Qwen3-VL-{size.upper()}-Instruct (safetensors: {total / 1e9:.2f}B params)"},
        "vision": vision,
        "connector": {"name": "qwen3-vl-merger", "options": {"ratio": 0.5, "levels": 3, "hidden_size": vision["config"]["hidden_size"] * 4}},
        "llm": llm,
        "image": {"size": 512, "grid": [32, 32], "tiles": 1, "note": "512x512 input; dynamic resolution (smart_resize) changes the grid"},
        "processor": QWEN3_VL, "tokens_note": "released preprocessor_config: min_pixels 65536, max_pixels 16777216",
        "stages": {"stage1-align": ["vision", "connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": TINY_QWEN3_VL_MODEL,
    }
    for size, total, vision, llm in (
        ("2b", 2.13e9, qwen3_vit(24, 1024, 4096, [5, 11, 17], 2048), _qwen3((2048, 6144, 28, 16), True, "Qwen3-1.7B")),
        ("4b", 4.44e9, qwen3_vit(24, 1024, 4096, [5, 11, 17], 2560), _qwen3((2560, 9728, 36, 32), True, "Qwen3-4B")),
        ("8b", 8.77e9, qwen3_vit(27, 1152, 4304, [8, 16, 24], 4096), _qwen3((4096, 12288, 36, 32), False, "Qwen3-8B")),
        ("32b", 33.4e9, qwen3_vit(27, 1152, 4304, [8, 16, 24], 5120), _qwen3((5120, 25600, 64, 64), False, "Qwen3-32B")),
    )
)


def _qwen3_moe(hidden: int, layers: int, heads: int, expert_width: int, label: str) -> dict:
    """Qwen3-MoE's decoder: 128 experts, 8 per token, in every layer."""
    return llama(151936, hidden, expert_width, layers, heads, 4, cls="Qwen3MoeConfig", label=label, head_dim=128,
                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=expert_width, decoder_sparse_step=1,
                 max_position_embeddings=262144)


PRESETS += tuple(
    {
        "name": f"qwen3-vl-{size}", "family": f"Qwen3-VL-{size.upper()}", "release": f"Qwen/Qwen3-VL-{size.upper()}-Instruct",
        "published": {"total": total, "source": f"Hugging Face model page Qwen/Qwen3-VL-{size.upper()}-Instruct (safetensors: {total / 1e9:.1f}B params)"},
        "vision": vision,
        "connector": {"name": "qwen3-vl-merger", "options": {"ratio": 0.5, "levels": 3, "hidden_size": vision["config"]["hidden_size"] * 4}},
        "llm": llm,
        "image": {"size": 512, "grid": [32, 32], "tiles": 1, "note": "512x512 input; dynamic resolution (smart_resize) changes the grid"},
        "processor": QWEN3_VL, "tokens_note": "released preprocessor_config: min_pixels 65536, max_pixels 16777216; 8 of 128 experts per token",
        "stages": {"stage1-align": ["vision", "connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": TINY_QWEN3_VL_MODEL,
    }
    for size, total, vision, llm in (
        ("30b-a3b", 31.1e9, qwen3_vit(27, 1152, 4304, [8, 16, 24], 2048), _qwen3_moe(2048, 48, 32, 768, "Qwen3-30B-A3B")),
        ("235b-a22b", 236e9, qwen3_vit(27, 1152, 4304, [8, 16, 24], 4096), _qwen3_moe(4096, 94, 64, 1536, "Qwen3-235B-A22B")),
    )
)
