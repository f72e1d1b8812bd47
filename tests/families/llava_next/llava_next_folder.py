"""A tiny random LLaVA-NeXT folder, saved with `save_pretrained` and an offline tokenizer
(vlmkit's byte-level one plus `<image>`), and its parity case: the same input ids and visual-token
counts as `LlavaNextProcessor` over the PIL image processor, pixels within docs/preprocessing.md's
tolerance, on wide, tall, square and very wide images."""

from __future__ import annotations

from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# A LLaVA-NeXT-style processor template: content lists only (image parts become "<image>\n").
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def llava_next_processor(folder):
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # The PIL image processor: the default one needs torchvision.
    return LlavaNextProcessor.from_pretrained(folder, local_files_only=True,
                                              image_processor=LlavaNextImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                              tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _parity_reference(folder, image, question, prompt, model):
    hf_proc = llava_next_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    hf_inputs = hf_proc(images=image, text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    theirs_pixels = hf_inputs["pixel_values"][0, : ours_pixels.shape[0]]
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - theirs_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return hf_inputs["input_ids"][0], {"attention_mask": hf_inputs["attention_mask"], "image_sizes": hf_inputs["image_sizes"],
                                       "pixel_values": ours_pixels[None]}


PARITY = ParityCase("llava_next", save_llava_next, "LlavaNextForConditionalGeneration", _parity_reference,
                    sizes=((72, 40), (24, 90), (64, 64), (100, 30)))
