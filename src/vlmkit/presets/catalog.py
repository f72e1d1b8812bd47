"""The seed's models as data: real shape (built on the meta device) and a tiny CPU variant.

Every figure under `published` names where it comes from. Real-shape configs follow each
release's config.json (the Hugging Face conversions where one exists); `docs/presets.md`
puts our per-part counts beside the seed's figures and explains the differences.
"""

from __future__ import annotations

from typing import Any

# ---- shared real-shape pieces --------------------------------------------------------------

CLIP_L_336 = {"model_class": "CLIPVisionModel", "config_class": "CLIPVisionConfig",
              "config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}
CLIP_L_224 = {**CLIP_L_336, "config": {**CLIP_L_336["config"], "image_size": 224}}
EVA_G = {"model_class": "Blip2VisionModel", "config_class": "Blip2VisionConfig",
         "config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14}}


def siglip_so400m(image_size: int) -> dict:
    return {"model_class": "SiglipVisionModel", "config_class": "SiglipVisionConfig",
            "config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                       "image_size": image_size, "patch_size": 14, "vision_use_head": False}}


QWEN2_VL_VIT = {"model_class": "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel",
                "config_class": "Qwen2VLVisionConfig",
                "config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                # Its PatchMerger is our pixel-shuffle connector (norm "pre"), counted as the connector.
                "drop": ["merger"], "output_dim": 1280}
MLLAMA_VIT = {"model_class": "MllamaVisionModel", "config_class": "MllamaVisionConfig", "config": {},
              # Final layer + 4 intermediate layers, concatenated: 5 x 1280.
              "output_dim": 7680}


def llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool = False, cls: str = "LlamaConfig", **extra) -> dict:
    return {"config_class": cls, "config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                                            "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **extra}}


LLAMA31_8B = llama(128256, 4096, 14336, 32, 32, 8)
LLAMA3_70B = llama(128256, 8192, 28672, 80, 64, 8)
MLLAMA_XATTN = {"heads": 32, "kv_heads": 8, "ffn": "swiglu", "ffn_hidden": 14336, "norm": "rmsnorm", "qk_norm": True, "every": 4}

# ---- tiny variants ---------------------------------------------------------------------------

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def tiny(connector: str, options: dict | None = None, *, fusion: str = "prefix", vision: str = "siglip", llm: str = "llama",
         image_size: int = 32, patch: int = 4) -> dict[str, Any]:
    """A ModelConfig dict with the family's connector and fusion at toy width (trains on CPU)."""
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
            "processor": {"image_size": image_size}, "fusion": fusion}


TINY_QFORMER = {"num_queries": 8, "hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64}

# ---- the presets ---------------------------------------------------------------------------

LLAVA_STAGES = {"stage1-align": ["connector"], "stage2-instruct": ["connector", "llm"]}

PRESET_DATA: list[dict[str, Any]] = [
    {
        "name": "llava-1.5-7b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-7b-hf",
        "published": {"total": 7.06e9, "source": "Hugging Face model page llava-hf/llava-1.5-7b-hf (safetensors: 7.06B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 4096, 11008, 32, 32, 32),
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip"),
    },
    {
        "name": "llava-1.5-13b", "family": "LLaVA-1.5", "release": "llava-hf/llava-1.5-13b-hf",
        "published": {"total": 13.35e9, "source": "Hugging Face model page llava-hf/llava-1.5-13b-hf (safetensors: 13.4B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 5120, 13824, 40, 40, 40),
        "image": {"size": 336, "grid": [24, 24], "tiles": 1},
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip"),
    },
    {
        "name": "llava-next", "family": "LLaVA-NeXT (v1.6, Mistral-7B)", "release": "llava-hf/llava-v1.6-mistral-7b-hf",
        "published": {"total": 7.57e9, "source": "Hugging Face model page llava-hf/llava-v1.6-mistral-7b-hf (safetensors: 7.57B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}},
        "llm": llama(32064, 4096, 14336, 32, 32, 8, cls="MistralConfig"),
        # The learned row-newline embedding appended after each unpadded feature row.
        "extra_params": {"connector": 4096},
        "image": {"size": 336, "grid": [24, 24], "tiles": 1, "note": "per 336 px tile; AnyRes adds tiles + newline tokens (vlmkit tokens)"},
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", llm="mistral"),
    },
    {
        "name": "blip2", "family": "BLIP-2 (OPT-2.7B)", "release": "Salesforce/blip2-opt-2.7b",
        "published": {"total": 3.74e9, "source": "Hugging Face model page Salesforce/blip2-opt-2.7b (safetensors: 3.74B params)"},
        "vision": EVA_G, "connector": {"name": "qformer", "options": {"num_queries": 32}},
        "llm": {"config_class": "OPTConfig", "config": {"vocab_size": 50304, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                                                         "num_attention_heads": 32, "word_embed_proj_dim": 2560, "max_position_embeddings": 2048}},
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["connector"]},
        "tiny": tiny("qformer", TINY_QFORMER),
    },
    {
        "name": "instructblip", "family": "InstructBLIP (Vicuna-7B)", "release": "Salesforce/instructblip-vicuna-7b",
        "published": {"total": 7.91e9, "source": "Hugging Face model page Salesforce/instructblip-vicuna-7b (safetensors: 7.91B params)"},
        "vision": EVA_G, "connector": {"name": "qformer", "options": {"num_queries": 32, "text_vocab": 30523, "max_text_positions": 512, "text_ffn": True}},
        "llm": llama(32001, 4096, 11008, 32, 32, 32),
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "stages": {"stage1-instruct": ["connector"]},
        "tiny": tiny("qformer", TINY_QFORMER),
    },
    {
        "name": "openflamingo", "family": "OpenFlamingo-9B (MPT-7B)", "release": "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        "published": {"total": None, "source": "no parameter total is published (the '9B' is a name); see docs/presets.md"},
        "vision": CLIP_L_224,
        "connector": {"name": "perceiver", "options": {"latents": 64, "layers": 6, "heads": 8, "head_dim": 64, "project_output": False, "output": "memory"}},
        "cross_attention": {"every": 4, "heads": 8, "head_dim": 64, "ffn": "gelu", "norm": "layernorm", "layers_path": "transformer.blocks"},
        "fusion": "cross-attention",
        "llm": {"config_class": "MptConfig", "config": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "vocab_size": 50432, "max_seq_len": 2048}},
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "stages": {"stage1-align": ["connector", "cross_attention"]},
        "tiny": tiny("perceiver", {"latents": 8, "layers": 1, "heads": 4, "head_dim": 12, "project_output": False, "output": "memory",
                                    "cross_attention": {"every": 1, "heads": 4}}, fusion="cross-attention", vision="clip"),
    },
    {
        "name": "idefics2", "family": "Idefics2-8B", "release": "HuggingFaceM4/idefics2-8b",
        "published": {"total": 8.40e9, "source": "Hugging Face model page HuggingFaceM4/idefics2-8b (safetensors: 8.4B params)"},
        "vision": siglip_so400m(980),
        "connector": {"name": "perceiver", "options": {"latents": 64, "layers": 3, "heads": 16, "head_dim": 96, "kv_heads": 4, "width": 4096,
                                                        "ffn": "swiglu", "norm": "rmsnorm", "norm_eps": 1e-6, "input_proj": "swiglu",
                                                        "input_proj_hidden": 14336, "project_output": False}},
        "llm": llama(32003, 4096, 14336, 32, 32, 8, cls="MistralConfig"),
        "image": {"size": 980, "grid": [70, 70], "tiles": 1},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("perceiver", {"latents": 8, "layers": 1, "heads": 4, "head_dim": 16, "kv_heads": 2, "width": 64, "ffn": "swiglu",
                                    "norm": "rmsnorm", "input_proj": "swiglu", "project_output": False}, llm="mistral"),
    },
    {
        "name": "internvl2-76b", "family": "InternVL2-Llama3-76B", "release": "OpenGVLab/InternVL2-Llama3-76B",
        "published": {"total": 76.26e9, "source": "Hugging Face model page OpenGVLab/InternVL2-Llama3-76B (safetensors: 76.3B params)"},
        "vision": {"model_class": "InternVLVisionModel", "config_class": "InternVLVisionConfig",
                   "config": {"hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45, "num_attention_heads": 25,
                              "image_size": 448, "patch_size": 14, "use_qk_norm": True, "norm_type": "rms_norm", "use_mean_pooling": False,
                              "attention_bias": True}},
        "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "post"}},
        "llm": llama(128265, 8192, 28672, 80, 64, 8),
        "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "per 448 px tile; dynamic tiling uses 1..40 tiles + thumbnail"},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", {"ratio": 0.5, "norm": "post"}),
    },
    *[
        {
            "name": f"qwen2-vl-{size}", "family": f"Qwen2-VL-{size.upper()}", "release": f"Qwen/Qwen2-VL-{size.upper()}-Instruct",
            "published": {"total": total, "source": f"Hugging Face model page Qwen/Qwen2-VL-{size.upper()}-Instruct (safetensors: {total / 1e9:.2f}B params)"},
            "vision": QWEN2_VL_VIT,
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "pre", "norm_eps": 1e-6, "hidden_size": 5120}},
            "llm": llm,
            "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "448x448 input; dynamic resolution (smart_resize) changes the grid"},
            "stages": {"stage1-align": ["vision", "connector"], "stage2-instruct": ["vision", "connector", "llm"]},
            "tiny": tiny("pixel-shuffle", {"ratio": 0.5, "norm": "pre", "hidden_size": 192}, llm="qwen2"),
        }
        for size, total, llm in (
            ("2b", 2.21e9, llama(151936, 1536, 8960, 28, 12, 2, tie=True, cls="Qwen2Config")),
            ("7b", 8.29e9, llama(152064, 3584, 18944, 28, 28, 4, cls="Qwen2Config")),
            ("72b", 73.4e9, llama(152064, 8192, 29568, 80, 64, 8, cls="Qwen2Config")),
        )
    ],
    {
        "name": "pixtral-12b", "family": "Pixtral-12B", "release": "mistral-community/pixtral-12b",
        "published": {"total": 12.7e9, "source": "Hugging Face model page mistral-community/pixtral-12b (safetensors: 12.7B params)"},
        "vision": {"kind": "rope-vit", "config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 16}},
        "connector": {"name": "native", "options": {"projector": "mlp"}},
        "llm": llama(131072, 5120, 14336, 40, 32, 8, cls="MistralConfig", head_dim=128),
        "image": {"size": 1024, "grid": [64, 64], "tiles": 1, "note": "1024x1024 input; any size up to 1024 per side, plus one [IMG_BREAK] per row"},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("native", {"projector": "mlp"}, vision="rope-vit", llm="mistral"),
    },
    *[
        {
            "name": f"llama-3.2-vision-{size}", "family": f"Llama 3.2 Vision {size.upper()}", "release": f"meta-llama/Llama-3.2-{size.upper()}-Vision",
            "published": {"total": total, "source": f"Meta model card Llama-3.2-{size.upper()}-Vision ({total / 1e9:.2f}B params)"},
            "vision": MLLAMA_VIT, "connector": {"name": "linear", "options": {}},
            "cross_attention": xattn, "fusion": "cross-attention",
            "llm": llm,
            # 4 tiles of 560 px, 40x40 patches + CLS each (the CLS is not a grid token; noted below).
            "image": {"size": 560, "grid": [40, 40], "tiles": 4, "extra_tokens": 4, "note": "4 tiles x (1600 patches + CLS) of cross-attention memory"},
            "stages": {"stage1-align": ["vision", "connector", "cross_attention"], "stage2-instruct": ["vision", "connector", "cross_attention", "llm"]},
            "tiny": tiny("linear", {"cross_attention": {"every": 1, "heads": 4, "kv_heads": 2, "ffn": "swiglu", "norm": "rmsnorm", "qk_norm": True}},
                         fusion="cross-attention"),
        }
        for size, total, llm, xattn in (
            ("11b", 10.67e9, LLAMA31_8B, MLLAMA_XATTN),
            ("90b", 88.6e9, LLAMA3_70B, {**MLLAMA_XATTN, "heads": 64, "ffn_hidden": 28672}),
        )
    ],
    {
        "name": "paligemma", "family": "PaliGemma-3B (224)", "release": "google/paligemma-3b-pt-224",
        "published": {"total": 2.92e9, "source": "Hugging Face model page google/paligemma-3b-pt-224 (safetensors: 2.92B params)"},
        "vision": siglip_so400m(224), "connector": {"name": "linear", "options": {}},
        "llm": llama(257216, 2048, 16384, 18, 8, 1, tie=True, cls="GemmaConfig", head_dim=256),
        "image": {"size": 224, "grid": [16, 16], "tiles": 1},
        "stages": {"stage1-pretrain": ["vision", "connector", "llm"]},
        "tiny": tiny("linear", llm="gemma"),
    },
    {
        "name": "fuyu-8b", "family": "Fuyu-8B", "release": "adept/fuyu-8b",
        "published": {"total": 9.41e9, "source": "Hugging Face model page adept/fuyu-8b (safetensors: 9.41B params)"},
        "vision": {"kind": "patchify", "config": {"patch_size": 30}}, "connector": {"name": "patch-embed", "options": {}},
        "llm": {"config_class": "PersimmonConfig", "config": {"vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 16384,
                                                               "num_hidden_layers": 36, "num_attention_heads": 64, "tie_word_embeddings": False}},
        "image": {"size": 1080, "grid": [36, 36], "tiles": 1, "note": "1080x1080 input; 30 px patches plus one newline token per row"},
        "stages": {"stage1-pretrain": ["connector", "llm"]},
        "tiny": tiny("patch-embed", vision="patchify"),
    },
    {
        "name": "idefics3-8b", "family": "Idefics3-8B-Llama3", "release": "HuggingFaceM4/Idefics3-8B-Llama3",
        "published": {"total": 8.46e9, "source": "Hugging Face model page HuggingFaceM4/Idefics3-8B-Llama3 (safetensors: 8.46B params)"},
        "vision": siglip_so400m(364),
        "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "none", "projector": "linear", "bias": False}},
        "llm": llama(128259, 4096, 14336, 32, 32, 8),
        "image": {"size": 364, "grid": [26, 26], "tiles": 1, "note": "per 364 px split; image splitting adds splits + a global view"},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", {"ratio": 0.5, "norm": "none", "projector": "linear", "bias": False}),
    },
    {
        "name": "smolvlm", "family": "SmolVLM-Instruct (2B)", "release": "HuggingFaceTB/SmolVLM-Instruct",
        "published": {"total": 2.25e9, "source": "Hugging Face model page HuggingFaceTB/SmolVLM-Instruct (safetensors: 2.25B params)"},
        "vision": siglip_so400m(384),
        "connector": {"name": "pixel-shuffle", "options": {"ratio": 1 / 3, "norm": "none", "projector": "linear", "bias": False}},
        "llm": llama(49155, 2048, 8192, 24, 32, 32, tie=False),
        "image": {"size": 384, "grid": [27, 27], "tiles": 1, "note": "per 384 px split; image splitting adds splits + a global view"},
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": tiny("pixel-shuffle", {"ratio": 1 / 3, "norm": "none", "projector": "linear", "bias": False}, image_size=24),
    },
]

# The seed's per-part figures, for the docs table and `vlmkit inspect`.
SEED_FIGURES: dict[str, dict[str, tuple[str, float]]] = {
    "internvl2-76b": {"vision": ("InternViT-6B", 6.0e9)},
    "qwen2-vl-72b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-7b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "qwen2-vl-2b": {"vision": ("ViT 675M (2D-RoPE)", 675e6)},
    "pixtral-12b": {"vision": ("Pixtral-ViT-400M", 400e6)},
    "llama-3.2-vision-11b": {"vision": ("ViT-H (630M)", 630e6)},
    "llama-3.2-vision-90b": {"vision": ("ViT-H (630M)", 630e6)},
    "llava-1.5-7b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
    "llava-1.5-13b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
}
