"""A tiny random Fuyu folder, saved with `save_pretrained` and an offline tokenizer (vlmkit's
byte-level one with Fuyu's `|SPEAKER|`, `|NEWLINE|`, `<s>` and `<0x04>`), for tests/hf/test_hf_fuyu.py."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.tokenizer import byte_level_tokenizer


def fuyu_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["|SPEAKER|", "|NEWLINE|", "<0x04>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = None
    return tok


def save_fuyu(folder: Path, *, seed: int = 0, patch: int = 6, height: int = 48, width: int = 72) -> Path:
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    torch.manual_seed(seed)
    tok = fuyu_tokenizer()
    text = {"model_type": "persimmon", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "vocab_size": len(tok), "qk_layernorm": True, "partial_rotary_factor": 0.5,
            "hidden_act": "relu2", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    config = FuyuConfig(text_config=text, patch_size=patch, num_channels=3, image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"),
                        image_size=height)
    model = FuyuForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = FuyuImageProcessorPil(size={"height": height, "width": width}, patch_size={"height": patch, "width": patch},
                                            image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    FuyuProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return Path(folder)
