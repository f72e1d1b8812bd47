"""Tiny random Hugging Face folders of the seed's families, saved with `save_pretrained` and an
offline tokenizer (vlmkit's byte-level one plus the family's special tokens), the way a user's
downloaded folder looks, for the import / export parity tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.tokenizer import byte_level_tokenizer

# Qwen2-VL's chat template, restated: a default system turn, content lists with image parts
# rendered as vision-start / image-pad / vision-end, plain string contents as they are.
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _sharpen(model) -> None:
    # Random init leaves the LM near-uniform; sharper logits make greedy comparisons meaningful,
    # and non-trivial norm weights show a mis-mapped norm.
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_q.weight" in name or "norm1.weight" in name or "norm2.weight" in name:
                p.uniform_(0.5, 1.5)


def qwen2vl_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = QWEN2VL_TEMPLATE
    return tok


def save_qwen2vl(folder: Path, *, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                 min_pixels: int = 256, max_pixels: int = 16384, version: str = "2") -> Path:
    """`version="2.5"`: a Qwen2.5-VL folder (windowed-attention tower, RMSNorm merger)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = qwen2vl_tokenizer()
    vocab = tok.get_vocab()
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    if version == "2.5":
        # Window of 16 px = 2x2 merge units of 4 px patches: several windows per image; block 1 attends fully.
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4, "temporal_patch_size": 2,
                  "spatial_merge_size": 2, "window_size": 16, "fullatt_block_indexes": [1], "out_hidden_size": text["hidden_size"],
                  **(vision or {})}
    else:
        vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4, "temporal_patch_size": 2,
                  "spatial_merge_size": 2, "hidden_size": text["hidden_size"], **(vision or {})}
    config_cls, model_cls = ((Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration) if version == "2.5"
                             else (Qwen2VLConfig, Qwen2VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"])
    model = model_cls(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=vision["patch_size"],
                             merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    return Path(folder)


    return Path(folder)
