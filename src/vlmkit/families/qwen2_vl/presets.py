"""Qwen2-VL 2B / 7B / 72B at real shape, and their tiny CPU variant."""

from __future__ import annotations

from vlmkit.presets.parts import llama, processor, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

QWEN2_VL_VIT = {"model_class": "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel",
                "config_class": "Qwen2VLVisionConfig",
                "config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                # Its PatchMerger is our pixel-shuffle connector (norm "pre"), counted as the connector.
                "drop": ["merger"], "output_dim": 1280}
QWEN2_VL = processor("qwen2vl", 448, CLIP_MEAN, CLIP_STD, min_pixels=3136, max_pixels=12845056)

# Toy sizes: 32 px images, 4 px patches (an 8x8 feature grid), so the family trains on CPU.
TINY_QWEN2_VL = {"patch_size": 4, "min_pixels": 16 * 16, "max_pixels": 64 * 64}
# Qwen2-VL's own tower (3D patch embedding over pre-flattened patches) and M-RoPE text decoder, at
# toy width; its 2x2 PatchMerger is the pixel-shuffle connector with a pre-norm.
TINY_QWEN2_VL_PARTS = {
    "vision": {"name": "qwen2-vit", "config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
                                               "temporal_patch_size": 2, "spatial_merge_size": 2}},
    "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "pre", "norm_eps": 1e-6, "hidden_size": 128}},
    "llm": {"name": "qwen2-vl-text-random", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}},
    "fusion": "prefix",
}
TINY_QWEN2_VL_MODEL = {**TINY_QWEN2_VL_PARTS, "processor": toy(QWEN2_VL, 32, **TINY_QWEN2_VL)}

PRESETS = tuple(
    {
        "name": f"qwen2-vl-{size}", "family": f"Qwen2-VL-{size.upper()}", "release": f"Qwen/Qwen2-VL-{size.upper()}-Instruct",
        "published": {"total": total, "source": f"Hugging Face model page Qwen/Qwen2-VL-{size.upper()}-Instruct (safetensors: {total / 1e9:.2f}B params)"},
        "vision": QWEN2_VL_VIT,
        "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "pre", "norm_eps": 1e-6, "hidden_size": 5120}},
        "llm": llm,
        "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "448x448 input; dynamic resolution (smart_resize) changes the grid"},
        # merge_size 2 (the processor's default) is the connector's 2x2 pixel shuffle (ratio 0.5).
        "processor": QWEN2_VL, "tokens_note": "released preprocessor_config: min_pixels 3136, max_pixels 12845056",
        "stages": {"stage1-align": ["vision", "connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": TINY_QWEN2_VL_MODEL,
        "lecture_figures": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    }
    for size, total, llm in (
        ("2b", 2.21e9, llama(151936, 1536, 8960, 28, 12, 2, tie=True, cls="Qwen2Config", label="Qwen2-1.5B")),
        ("7b", 8.29e9, llama(152064, 3584, 18944, 28, 28, 4, cls="Qwen2Config", label="Qwen2-7B")),
        ("72b", 73.4e9, llama(152064, 8192, 29568, 80, 64, 8, cls="Qwen2Config", label="Qwen2-72B")),
    )
)
