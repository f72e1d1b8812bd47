"""Ovis2-1B and Ovis2-2B at real shape, and their tiny CPU variant.

The figures are those of `AIDC-AI/Ovis2-1B` / `-2B`'s configs as this project knows them (not
re-read from this offline machine):
* the ViT: AIMv2-Large-patch14-448 (hidden 1024, intermediate 2816, 24 layers, 8 heads, patch 14,
  448 px, RMSNorm, SwiGLU), no pooling head;
* the visual tokenizer: hidden_stride 2 (2x2 blocks folded into 4096 channels), a visual
  vocabulary of 65536 rows (5 of them the structure tokens), softmax;
* the LLM: Qwen2.5-0.5B-Instruct (1B) / Qwen2.5-1.5B-Instruct (2B), whose released checkpoints
  hold the LM head as its own tensor (Ovis2-2B's model.safetensors is 4.91 GB of BF16, 2.455B
  parameters, which a tied head would leave 233M short of), so the presets count it untied;
* the image processor: 448 px tiles, covering-area grid, up to 9 tiles + a thumbnail, CLIP
  mean / std, bicubic; 256 atoms per tile.
"""

from __future__ import annotations

from vlmkit.families.ovis2.processor import CLIP_MEAN, CLIP_STD, TAGS
from vlmkit.presets.parts import llama, processor, toy

AIMV2_LARGE_448 = {"model_class": "Aimv2VisionModel", "config_class": "Aimv2VisionConfig",
                   "config": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 8,
                              "image_size": 448, "patch_size": 14, "use_head": False, "is_native": False}}
MARKERS = list(TAGS.values())
TABLE = {"vocab_size": 65536, "ratio": 0.5, "markers": MARKERS}
OVIS2_PROCESSOR = processor("ovis2", 448, CLIP_MEAN, CLIP_STD, patch_size=14, downsample_ratio=0.5, max_num=9)
TINY_OPTIONS = {"vocab_size": 96, "ratio": 0.5, "markers": MARKERS}


def _tiny() -> dict:
    return {"vision": {"name": "hf-random", "model_type": "aimv2_vision_model",
                       "config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "image_size": 32, "patch_size": 4, "use_head": False}},
            "connector": {"name": "visual-embedding-table", "options": TINY_OPTIONS},
            "llm": {"name": "hf-random", "model_type": "qwen2",
                    "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 2048}},
            "processor": toy(OVIS2_PROCESSOR, 32, patch_size=4, max_num=6), "fusion": "prefix", "image_token": "<IMG_ATOM>"}


def _preset(size: str, llm: dict, total: float, source: str) -> dict:
    return {
        "name": f"ovis2-{size.lower()}", "family": f"Ovis2 {size}", "release": f"AIDC-AI/Ovis2-{size}",
        "published": {"total": total, "source": source},
        "vision": AIMV2_LARGE_448,
        "connector": {"name": "visual-embedding-table", "options": TABLE},
        "llm": llm,
        "image": {"size": 448, "grid": [32, 32], "tiles": 1, "note": "per 448 px tile; up to 9 tiles + a thumbnail"},
        "processor": OVIS2_PROCESSOR, "tokens_note": "448 px tiles, 256 tokens each (2x2 fold); up to 9 tiles + a thumbnail",
        "stages": {"stage1-align": ["connector"], "stage2-instruct": ["vision", "connector", "llm"]},
        "tiny": _tiny(),
    }


PRESETS = (
    _preset("1B", llama(151936, 896, 4864, 24, 14, 2, cls="Qwen2Config", label="Qwen2.5-0.5B-Instruct",
                        max_position_embeddings=32768), 1.27e9,
            "Hugging Face model page AIDC-AI/Ovis2-1B (safetensors: 1.27B params; as recalled, not re-checked from this "
            "offline machine)"),
    _preset("2B", llama(151936, 1536, 8960, 28, 12, 2, cls="Qwen2Config", label="Qwen2.5-1.5B-Instruct",
                        max_position_embeddings=32768), 2.455e9,
            "Hugging Face file list of AIDC-AI/Ovis2-2B: model.safetensors 4.91 GB, BF16 (2 bytes a parameter)"),
)
