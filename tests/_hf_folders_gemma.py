"""Tiny random PaliGemma and Gemma 3 folders saved with `save_pretrained` and their processors
(the PIL image processors; an offline byte-level tokenizer plus the family's special tokens)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.tokenizer import byte_level_tokenizer


def _sharpen(model) -> None:
    # Random init leaves the LM near-uniform: sharper logits make greedy comparisons meaningful;
    # non-trivial norm weights show a mis-mapped norm.
    with torch.no_grad():
        model.lm_head.weight.mul_(8) if not model.config.tie_word_embeddings else model.get_input_embeddings().weight.mul_(4)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.rsplit(".", 2)[-2]:
                p.uniform_(0.5, 1.5) if "language_model" not in name else p.uniform_(-0.3, 0.3)


def save_paligemma(folder: Path, *, seed: int = 0, size: int = 32, patch: int = 8, text: dict | None = None) -> Path:
    """`text={"model_type": "gemma2", ...}`: PaliGemma 2."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.chat_template = None  # released PaliGemma folders have none
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tokens = (size // patch) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_seq_length=tokens,
                                              image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds its <loc> / <seg> tokens
    text = {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": size,
              "patch_size": patch, "vision_use_head": False}
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=len(tok))
    model = PaliGemmaForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


# Gemma 3's chat template, restated: bos, turns, content lists with image parts as <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_gemma3(folder: Path, *, seed: int = 0, size: int = 32, patch: int = 4, tokens_per_image: int = 16,
                sliding_window: int = 24) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_image>", "<end_of_image>", "<image_soft_token>",
                                                          "<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False)
    tok.chat_template = GEMMA3_TEMPLATE
    from vlmkit.hf.families.gemma3 import with_named_tokens

    tok = with_named_tokens(tok, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    vocab = tok.get_vocab()
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "sliding_window": sliding_window, "layer_types": ["sliding_attention", "full_attention"],
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": size,
              "patch_size": patch}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5, 0.4, 0.3],
                                              image_std=[0.25, 0.3, 0.35])
    Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens_per_image,
                    chat_template=GEMMA3_TEMPLATE).save_pretrained(folder)
    return Path(folder)
