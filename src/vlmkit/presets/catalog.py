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
CLIP_L_224 = {**CLIP_L_336, "config": {**CLIP_L_336["config"], "image_size": 224}}
EVA_G = {"model_class": "Blip2VisionModel", "config_class": "Blip2VisionConfig",
         "config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14}}


def siglip_so400m(image_size: int) -> dict:
    return {"model_class": "SiglipVisionModel", "config_class": "SiglipVisionConfig",
            "config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                       "image_size": image_size, "patch_size": 14, "vision_use_head": False}}


MLLAMA_VIT = {"model_class": "MllamaVisionModel", "config_class": "MllamaVisionConfig", "config": {},
              # Final layer + 4 intermediate layers, concatenated: 5 x 1280.
              "output_dim": 7680}


def llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool = False, cls: str = "LlamaConfig",
          *, label: str, **extra) -> dict:
    """`label` names the language model in `vlmkit tokens`; `extra` (e.g. max_position_embeddings,
    which sets the context the token budget reports) goes to the config class."""
    return {"config_class": cls, "label": label,
            "config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **extra}}


VICUNA_7B = llama(32064, 4096, 11008, 32, 32, 32, label="Vicuna-7B (Llama-2-7B)", max_position_embeddings=4096)
LLAMA31_8B = llama(128256, 4096, 14336, 32, 32, 8, label="Llama-3.1-8B", max_position_embeddings=131072)
LLAMA3_70B = llama(128256, 8192, 28672, 80, 64, 8, label="Llama-3.1-70B", max_position_embeddings=131072)
MLLAMA_XATTN = {"heads": 32, "kv_heads": 8, "ffn": "swiglu", "ffn_hidden": 14336, "norm": "rmsnorm", "qk_norm": True, "every": 4}

# ---- image processors ------------------------------------------------------------------------

def processor(name: str, image_size: int, mean, std, resample: str = "bicubic", **options) -> dict[str, Any]:
    """A ProcessorConfig dict: `name` is a family in IMAGE_PROCESSORS, `options` its settings."""
    return {"name": name, "image_size": image_size, "mean": mean, "std": std, "resample": resample, "options": options}


def toy(real: dict[str, Any], image_size: int, **options) -> dict[str, Any]:
    """The real preset's processor family and normalisation at toy size (for the tiny variant)."""
    return {**real, "image_size": image_size, "options": {**real["options"], **options}}


CLIP_336 = processor("fixed", 336, CLIP_MEAN, CLIP_STD)
BLIP_224 = processor("fixed", 224, CLIP_MEAN, CLIP_STD)
LLAVA_NEXT = processor("anyres", 336, CLIP_MEAN, CLIP_STD)
MLLAMA = processor("mllama", 560, HALF_MEAN, HALF_STD, resample="bilinear", max_tiles=4)

# Toy sizes: 32 px images, 4 px patches (an 8x8 feature grid), so every family trains on CPU.
TINY_ANYRES = {"patch_size": 4, "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}

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


TINY_QFORMER = {"num_queries": 8, "hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64}

# ---- the presets ---------------------------------------------------------------------------

# `processor`: the image processor of the release (a ProcessorConfig). Where the token count is
# the connector's (fixed resolution, Q-Former, Perceiver) the processor does not state it:
# `vlmkit tokens` asks the connector, `num_tokens(image.grid)`. Where a processor option must
# agree with the connector (a pixel-shuffle factor), it is derived from the connector options.
# `tokens_note`: the remark `vlmkit tokens` prints under the preset.

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
        "name": "blip2", "family": "BLIP-2 (OPT-2.7B)", "release": "Salesforce/blip2-opt-2.7b",
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
    *[
        {
            "name": f"llama-3.2-vision-{size}", "family": f"Llama 3.2 Vision {size.upper()}", "release": f"meta-llama/Llama-3.2-{size.upper()}-Vision",
            "published": {"total": total, "source": f"Meta model card Llama-3.2-{size.upper()}-Vision ({total / 1e9:.2f}B params)"},
            "vision": MLLAMA_VIT, "connector": {"name": "linear", "options": {}},
            "cross_attention": xattn, "fusion": "cross-attention",
            "llm": llm,
            # 4 tiles of 560 px, 40x40 patches + CLS each (the CLS is not a grid token; noted below).
            "image": {"size": 560, "grid": [40, 40], "tiles": 4, "extra_tokens": 4, "note": "4 tiles x (1600 patches + CLS) of cross-attention memory"},
            "processor": MLLAMA, "tokens_note": "cross-attention: 1 sequence token per image",
            "stages": {"stage1-align": ["vision", "connector", "cross_attention"], "stage2-instruct": ["vision", "connector", "cross_attention", "llm"]},
            "tiny": tiny("linear", {"cross_attention": {"every": 1, "heads": 4, "kv_heads": 2, "ffn": "swiglu", "norm": "rmsnorm", "qk_norm": True}},
                         fusion="cross-attention", processor=toy(MLLAMA, 32, patch_size=4)),
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
    "blip2-opt-2.7b": "blip2",
    "paligemma-3b": "paligemma",
}

# The seed's per-part figures, for the docs table and `vlmkit inspect`.
SEED_FIGURES: dict[str, dict[str, tuple[str, float]]] = {
    "internvl2-76b": {"vision": ("InternViT-6B", 6.0e9)},
    "internvl2-76b-40tiles": {"vision": ("InternViT-6B", 6.0e9)},
    "pixtral-12b": {"vision": ("Pixtral-ViT-400M", 400e6)},
    "llama-3.2-vision-11b": {"vision": ("ViT-H (630M)", 630e6)},
    "llama-3.2-vision-90b": {"vision": ("ViT-H (630M)", 630e6)},
    "llava-1.5-7b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
    "llava-1.5-13b": {"vision": ("frozen CLIP ViT-L (307M)", 307e6)},
}
