"""The seed's models as data: real shape (built on the meta device), the image processor that
feeds it, and a tiny CPU variant with the same processor family at toy size.

This is the one preset table: `vlmkit inspect` builds the real shape from an entry, `vlmkit
tokens` builds the entry's processor and reads its LLM shape and connector from the same entry.
Every figure under `published` names where it comes from. Real-shape configs follow each
release's config.json (the Hugging Face conversions where one exists); `docs/presets.md`
puts our per-part counts beside the seed's figures and explains the differences.
"""

from __future__ import annotations

from typing import Any

from vlmkit.processing.images import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD

# ---- shared real-shape pieces --------------------------------------------------------------

CLIP_L_336 = {"model_class": "CLIPVisionModel", "config_class": "CLIPVisionConfig",
              "config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}


def siglip_so400m(image_size: int) -> dict:
    return {"model_class": "SiglipVisionModel", "config_class": "SiglipVisionConfig",
            "config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                       "image_size": image_size, "patch_size": 14, "vision_use_head": False}}


QWEN2_VL_VIT = {"model_class": "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel",
                "config_class": "Qwen2VLVisionConfig",
                "config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                # Its PatchMerger is our pixel-shuffle connector (norm "pre"), counted as the connector.
                "drop": ["merger"], "output_dim": 1280}


def llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool = False, cls: str = "LlamaConfig",
          *, label: str, **extra) -> dict:
    """`label` names the language model in `vlmkit tokens`; `extra` (e.g. max_position_embeddings,
    which sets the context the token budget reports) goes to the config class."""
    return {"config_class": cls, "label": label,
            "config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **extra}}


VICUNA_7B = llama(32064, 4096, 11008, 32, 32, 32, label="Vicuna-7B (Llama-2-7B)", max_position_embeddings=4096)

# ---- image processors ------------------------------------------------------------------------

def processor(name: str, image_size: int, mean, std, resample: str = "bicubic", **options) -> dict[str, Any]:
    """A ProcessorConfig dict: `name` is a family in IMAGE_PROCESSORS, `options` its settings."""
    return {"name": name, "image_size": image_size, "mean": mean, "std": std, "resample": resample, "options": options}


def toy(real: dict[str, Any], image_size: int, **options) -> dict[str, Any]:
    """The real preset's processor family and normalisation at toy size (for the tiny variant)."""
    return {**real, "image_size": image_size, "options": {**real["options"], **options}}


QWEN2_VL = processor("qwen2vl", 448, CLIP_MEAN, CLIP_STD, min_pixels=3136, max_pixels=12845056)

# Toy sizes: 32 px images, 4 px patches (an 8x8 feature grid), so every family trains on CPU.
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

# ---- tiny variants ---------------------------------------------------------------------------

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def tiny(connector: str, options: dict | None = None, *, processor: dict[str, Any], fusion: str = "prefix", vision: str = "siglip",
         llm: str = "llama", patch: int = 4) -> dict[str, Any]:
    """A ModelConfig dict with the family's connector, fusion and processor at toy width (trains on CPU)."""
    image_size = processor["image_size"]
    if vision in ("siglip", "clip"):
        cfg = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
        if vision == "siglip":
            cfg["vision_use_head"] = False
        vis = {"name": "hf-random", "model_type": f"{vision}_vision_model", "config": cfg}
    elif vision == "rope-vit":
        vis = {"name": "rope-vit", "config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": patch}}
    else:
        vis = {"name": "patchify", "config": {"patch_size": patch}}
    llm_cfg = dict(TINY_LLM)
    if llm == "gemma":
        llm_cfg["head_dim"] = 16
    return {"vision": vis, "connector": {"name": connector, "options": options or {}},
            "llm": {"name": "hf-random", "model_type": llm, "config": llm_cfg},
            "processor": processor, "fusion": fusion}


# ---- the presets ---------------------------------------------------------------------------

# `processor`: the image processor of the release (a ProcessorConfig). Where the token count is
# the connector's (fixed resolution, Q-Former, Perceiver) the processor does not state it:
# `vlmkit tokens` asks the connector, `num_tokens(image.grid)`. Where a processor option must
# agree with the connector (a pixel-shuffle factor), it is derived from the connector options.
# `tokens_note`: the remark `vlmkit tokens` prints under the preset.

TINY_QWEN2_VL_MODEL = {**TINY_QWEN2_VL_PARTS, "processor": toy(QWEN2_VL, 32, **TINY_QWEN2_VL)}



PRESET_DATA: list[dict[str, Any]] = [
    *[
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
        }
        for size, total, llm in (
            ("2b", 2.21e9, llama(151936, 1536, 8960, 28, 12, 2, tie=True, cls="Qwen2Config", label="Qwen2-1.5B")),
            ("7b", 8.29e9, llama(152064, 3584, 18944, 28, 28, 4, cls="Qwen2Config", label="Qwen2-7B")),
            ("72b", 73.4e9, llama(152064, 8192, 29568, 80, 64, 8, cls="Qwen2Config", label="Qwen2-72B")),
        )
    ],
]

# Other names for the same preset (the release names people type).
ALIASES: dict[str, str] = {
}

# The seed's per-part figures, for the docs table and `vlmkit inspect`.
SEED_FIGURES: dict[str, dict[str, tuple[str, float]]] = {
    "qwen2-vl-72b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-7b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-2b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
}
