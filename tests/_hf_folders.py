"""Tiny random Hugging Face folders of the seed's families, saved with `save_pretrained` and an
offline tokenizer (vlmkit's byte-level one plus the family's special tokens), the way a user's
downloaded folder looks, for the import / export parity tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.tokenizer import byte_level_tokenizer

# A LLaVA-NeXT-style processor template: content lists only (image parts become "<image>\n").
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
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


def llava_next_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return tok


def save_llava_next(folder: Path, *, seed: int = 0, tower: str = "clip", text: dict | None = None,
                    vision: dict | None = None, tile: int = 32, patch: int = 8) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(seed)
    tok = llava_next_tokenizer()
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[tower]
    vision = {"model_type": model_type, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": tile, "patch_size": patch, **(vision or {})}
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    strategy = "default" if tower == "clip" else "full"
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy=strategy, image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                                 image_grid_pinpoints=pinpoints, image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=strategy,
                       chat_template=LLAVA_NEXT_TEMPLATE, image_token="<image>",
                       num_additional_image_tokens=1 if tower == "clip" else 0).save_pretrained(folder)
    return Path(folder)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def save_idefics3(folder: Path, *, seed: int = 0, crop: int = 32, patch: int = 4, longest_edge: int = 96) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]},
                           replace_extra_special_tokens=False)
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": crop, "patch_size": patch}
    config = Idefics3Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    model = Idefics3ForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": crop},
                                                image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=(crop // patch) ** 2 // 4,
                      chat_template=IDEFICS3_TEMPLATE).save_pretrained(folder)
    return Path(folder)


INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def internvl_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>"]}, replace_extra_special_tokens=False)
    tok.chat_template = INTERNVL_TEMPLATE
    return tok


def save_internvl(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 4, max_patches: int = 6) -> Path:
    """An InternVL folder. Its HF processor needs torchvision (video), so only the image processor
    (GotOcr2's PIL one), the tokenizer and the chat template are written, with the processor's
    image settings in processor_config.json."""
    import json

    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    tok = internvl_tokenizer()
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": [tile, tile], "patch_size": [patch, patch]}
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = InternVLForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=max_patches,
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": (tile // patch) ** 2 // 4, "image_token": "<IMG_CONTEXT>"}))
    return Path(folder)
