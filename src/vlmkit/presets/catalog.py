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

from vlmkit.processing.images import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD

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


CLIP_336 = processor("fixed", 336, CLIP_MEAN, CLIP_STD)
LLAVA_NEXT = processor("anyres", 336, CLIP_MEAN, CLIP_STD)
QWEN2_VL = processor("qwen2vl", 448, CLIP_MEAN, CLIP_STD, min_pixels=3136, max_pixels=12845056)

# Toy sizes: 32 px images, 4 px patches (an 8x8 feature grid), so every family trains on CPU.
TINY_ANYRES = {"patch_size": 4, "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}
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

LLAVA_STAGES = {"stage1-align": ["connector"], "stage2-instruct": ["connector", "llm"]}
INTERNVL_SHUFFLE = {"ratio": 0.5, "norm": "post"}
INTERNVL2_76B = {
    "name": "internvl2-76b", "family": "InternVL2-Llama3-76B", "release": "OpenGVLab/InternVL2-Llama3-76B",
    "published": {"total": 76.26e9, "source": "Hugging Face model page OpenGVLab/InternVL2-Llama3-76B (safetensors: 76.3B params)"},
    "vision": {"model_class": "InternVLVisionModel", "config_class": "InternVLVisionConfig",
               "config": {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
                          "image_size": 448, "patch_size": 14, "use_qk_norm": True, "norm_type": "rms_norm", "use_mean_pooling": False,
                          "attention_bias": True}},
    "connector": {"name": "pixel-shuffle", "options": INTERNVL_SHUFFLE},
    "llm": llama(128265, 8192, 28672, 80, 64, 8, label="Hermes-2-Theta-Llama-3-70B", max_position_embeddings=8192),
    "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "per 448 px tile; dynamic tiling uses 1..40 tiles + thumbnail"},
    "processor": processor("dynamic", 448, IMAGENET_MEAN, IMAGENET_STD, max_num=12, downsample_ratio=INTERNVL_SHUFFLE["ratio"]),
    "tokens_note": "max_dynamic_patch 12 (the released config)",
    "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
}
INTERNVL2_76B["tiny"] = tiny("pixel-shuffle", INTERNVL_SHUFFLE, processor=toy(INTERNVL2_76B["processor"], 32, patch_size=4))


def idefics3_like(scale: int, crop: int, patch: int, longest_edge: int, tiny_size: int) -> tuple[dict, dict, dict]:
    """Connector options, processor and tiny processor of an Idefics3-style model: the
    processor's scale factor is the connector's pixel-shuffle factor, stated once."""
    connector = {"ratio": 1 / scale, "norm": "none", "projector": "linear", "bias": False}
    real = processor("idefics3", crop, HALF_MEAN, HALF_STD, longest_edge=longest_edge, patch_size=patch, scale_factor=scale)
    return connector, real, toy(real, tiny_size, longest_edge=4 * tiny_size, patch_size=4)


IDEFICS3_SHUFFLE, IDEFICS3_PROC, IDEFICS3_TINY = idefics3_like(2, 364, 14, 4 * 364, 32)
SMOLVLM_SHUFFLE, SMOLVLM_PROC, SMOLVLM_TINY = idefics3_like(3, 384, 14, 1536, 24)
SMOLVLM_256M_SHUFFLE, SMOLVLM_256M_PROC, SMOLVLM_256M_TINY = idefics3_like(4, 512, 16, 2048, 32)

# The seed deck's AnyRes example: 448 px tiles on the LLaVA-NeXT recipe, a 224 px global view,
# no unpadding or row newlines; the "-shuffle" variant adds InternVL's 2x2 pixel shuffle.
SEED_PINPOINTS = [[448, 896], [896, 448], [896, 896], [1344, 448], [448, 1344], [896, 1344], [1344, 896]]
SEED_SHUFFLE = {"ratio": 0.5, "norm": "post"}


def anyres_seed(name: str, connector: dict, pixel_shuffle: int, note: str) -> dict[str, Any]:
    real = processor("anyres", 448, CLIP_MEAN, CLIP_STD, grid_pinpoints=SEED_PINPOINTS, unpad=False, newline=False,
                     base_size=224, pixel_shuffle=pixel_shuffle)
    return {
        "name": name, "family": "AnyRes (the seed deck's example)", "release": "none (an illustration, not a released model)",
        "published": {"total": None, "source": "not a released model: CLIP ViT-L/14 at 448 px + Vicuna-7B, the seed deck's AnyRes example"},
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


PRESET_DATA: list[dict[str, Any]] = [
    {
        "name": "llava-1.5-7b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-7b-hf",
        "published": {"total": 7.06e9, "source": "Hugging Face model page llava-hf/llava-1.5-7b-hf (safetensors: 7.06B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": VICUNA_7B,
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "processor": CLIP_336, "tokens_note": "336 px, 24x24 patches",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(CLIP_336, 32)),
    },
    {
        "name": "llava-1.5-13b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-13b-hf",
        "published": {"total": 13.35e9, "source": "Hugging Face model page llava-hf/llava-1.5-13b-hf (safetensors: 13.4B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 5120, 13824, 40, 40, 40, label="Vicuna-13B (Llama-2-13B)", max_position_embeddings=4096),
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "processor": CLIP_336, "tokens_note": "336 px, 24x24 patches",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(CLIP_336, 32)),
    },
    {
        "name": "llava-next", "family": "LLaVA-NeXT (v1.6, Mistral-7B)", "release": "llava-hf/llava-v1.6-mistral-7b-hf",
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
        "name": "llava-next-7b", "family": "LLaVA-NeXT (v1.6, Vicuna-7B)", "release": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "published": {"total": None, "source": "llava-hf/llava-v1.6-vicuna-7b-hf: no total written down (not checked from this offline machine)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": VICUNA_7B,
        "extra_params": {"connector": 4096},
        "image": {"size": 336, "grid": [24, 24], "tiles": 1, "note": "per 336 px tile; AnyRes adds tiles + newline tokens (vlmkit tokens)"},
        "processor": LLAVA_NEXT, "tokens_note": "llava-v1.6 pinpoints, 336 px tiles",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(LLAVA_NEXT, 32, **TINY_ANYRES)),
    },
    anyres_seed("anyres-seed", {"name": "mlp", "options": {}}, 1,
                "the seed deck's AnyRes example: 448 px tiles (1024 tokens) + 224 px global (256)"),
    anyres_seed("anyres-seed-shuffle", {"name": "pixel-shuffle", "options": SEED_SHUFFLE}, round(1 / SEED_SHUFFLE["ratio"]),
                "the same with a 2x2 pixel shuffle (InternVL-style, 1/4 of the tokens)"),
    {
        "name": "idefics2", "family": "Idefics2-8B", "release": "HuggingFaceM4/idefics2-8b",
        "published": {"total": 8.40e9, "source": "Hugging Face model page HuggingFaceM4/idefics2-8b (safetensors: 8.4B params)"},
        "vision": siglip_so400m(980),
        "connector": {"name": "perceiver", "options": {"latents": 64, "layers": 3, "heads": 16, "head_dim": 96, "kv_heads": 4, "width": 4096,
                                                        "ffn": "swiglu", "norm": "rmsnorm", "norm_eps": 1e-6, "input_proj": "swiglu",
                                                        "input_proj_hidden": 14336, "project_output": False}},
        "llm": llama(32003, 4096, 14336, 32, 32, 8, cls="MistralConfig", label="Mistral-7B-v0.1", max_position_embeddings=32768),
        "image": {"size": 980, "grid": [70, 70], "tiles": 1},
        # Idefics2 keeps the aspect ratio (longest edge 980) and pads; image splitting is off by
        # default. The count is the Perceiver's, whatever the size.
        "processor": processor("fixed", 980, HALF_MEAN, HALF_STD),
        "tokens_note": "64 Perceiver latents per image (image splitting off, the released default)",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("perceiver", {"latents": 8, "layers": 1, "heads": 4, "head_dim": 16, "kv_heads": 2, "width": 64, "ffn": "swiglu",
                                    "norm": "rmsnorm", "input_proj": "swiglu", "project_output": False}, llm="mistral",
                     processor=processor("fixed", 32, HALF_MEAN, HALF_STD)),
    },
    INTERNVL2_76B,
    {
        **INTERNVL2_76B, "name": "internvl2-76b-40tiles", "family": "InternVL2-Llama3-76B (max_num 40)",
        "image": {**INTERNVL2_76B["image"], "note": "per 448 px tile; dynamic tiling uses 1..40 tiles + thumbnail (here up to 40)"},
        "processor": {**INTERNVL2_76B["processor"], "options": {**INTERNVL2_76B["processor"]["options"], "max_num": 40}},
        "tokens_note": "max_num 40, the seed's tile cap",
        "tiny": {**INTERNVL2_76B["tiny"], "processor": toy(INTERNVL2_76B["tiny"]["processor"], 32, max_num=40)},
    },
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
    {
        "name": "pixtral-12b", "family": "Pixtral-12B", "release": "mistral-community/pixtral-12b",
        "published": {"total": 12.7e9, "source": "Hugging Face model page mistral-community/pixtral-12b (safetensors: 12.7B params)"},
        "vision": {"kind": "rope-vit", "config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 16}},
        "connector": {"name": "native", "options": {"projector": "mlp"}},
        "llm": llama(131072, 5120, 14336, 40, 32, 8, cls="MistralConfig", label="Mistral-NeMo-12B", head_dim=128),
        "image": {"size": 1024, "grid": [64, 64], "tiles": 1, "note": "1024x1024 input; any size up to 1024 per side, plus one [IMG_BREAK] per row"},
        "processor": processor("pixtral", 1024, CLIP_MEAN, CLIP_STD, patch_size=16), "tokens_note": "longest edge 1024, patch 16",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("native", {"projector": "mlp"}, vision="rope-vit", llm="mistral",
                     processor=processor("pixtral", 32, CLIP_MEAN, CLIP_STD, patch_size=4)),
    },
    {
        "name": "paligemma", "family": "PaliGemma-3B (224)", "release": "google/paligemma-3b-pt-224",
        "published": {"total": 2.92e9, "source": "Hugging Face model page google/paligemma-3b-pt-224 (safetensors: 2.92B params)"},
        "vision": siglip_so400m(224), "connector": {"name": "linear", "options": {}},
        "llm": llama(257216, 2048, 16384, 18, 8, 1, tie=True, cls="GemmaConfig", label="Gemma-2B", head_dim=256),
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        # PaliGemma resizes to 224x224 without keeping the aspect ratio.
        "processor": processor("fixed", 224, HALF_MEAN, HALF_STD, fit="squash"), "tokens_note": "224 px, 16x16 patches",
        "stages": {"stage1-pretrain": ["vision", "connector", "llm"]},
        "tiny": tiny("linear", llm="gemma", processor=processor("fixed", 32, HALF_MEAN, HALF_STD, fit="squash")),
    },
    {
        "name": "idefics3-8b", "family": "Idefics3-8B-Llama3", "release": "HuggingFaceM4/Idefics3-8B-Llama3",
        "published": {"total": 8.46e9, "source": "Hugging Face model page HuggingFaceM4/Idefics3-8B-Llama3 (safetensors: 8.46B params)"},
        "vision": siglip_so400m(364),
        "connector": {"name": "pixel-shuffle", "options": IDEFICS3_SHUFFLE},
        "llm": llama(128259, 4096, 14336, 32, 32, 8, label="Llama-3.1-8B", max_position_embeddings=131072),
        "image": {"size": 364, "grid": [26, 26], "tiles": 1, "note": "per 364 px split; image splitting adds splits + a global view"},
        "processor": IDEFICS3_PROC, "tokens_note": "364 px crops, 169 tokens each",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", IDEFICS3_SHUFFLE, processor=IDEFICS3_TINY),
    },
    {
        "name": "smolvlm", "family": "SmolVLM-Instruct (2B)", "release": "HuggingFaceTB/SmolVLM-Instruct",
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
]

# Other names for the same preset (the release names people type).
ALIASES: dict[str, str] = {
    "llava-v1.6-mistral-7b": "llava-next",
    "llava-v1.6-vicuna-7b": "llava-next-7b",
    "llava-next-mistral-7b": "llava-next",
    "llava-next-vicuna-7b": "llava-next-7b",
    "smolvlm-instruct": "smolvlm",
    "smolvlm-2b": "smolvlm",
    "internvl2-llama3-76b": "internvl2-76b",
    "paligemma-3b": "paligemma",
}

# The seed's per-part figures, for the docs table and `vlmkit inspect`.
SEED_FIGURES: dict[str, dict[str, tuple[str, float]]] = {
    "internvl2-76b": {"vision": ("InternViT-6B", 6.0e9)},
    "internvl2-76b-40tiles": {"vision": ("InternViT-6B", 6.0e9)},
    "qwen2-vl-72b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-7b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-2b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "pixtral-12b": {"vision": ("Pixtral-ViT-400M", 400e6)},
    "llava-1.5-7b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
    "llava-1.5-13b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
}
