"""A tiny random Aya Vision folder, saved with `save_pretrained`: a SigLIP tower, Aya's pixel
shuffle + SwiGLU projector, a Cohere2 decoder (sliding-window layers, a logit scale), GotOcr2's PIL
image processor (tiles + thumbnail) and `AyaVisionProcessor` with an offline tokenizer (vlmkit's
byte-level one with Aya's image and turn tokens), and its parity case: the same input ids as
AyaVisionProcessor's chat template (tile tags, patch tokens), the same tiles and pixels as its
GotOcr2 PIL image processor (within the pixel tolerance of vlmkit's default resize), on one-tile,
wide, tall, odd and many-tile images."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.core.types import Message
from vlmkit.processing import build_chat_processor
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# A Cohere-style chat template in Aya's manner (restated, not copied): turn tokens, content lists
# whose image parts render as "<image>" directly before the text, plain strings as they are.
AYA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% elif message['role'] == 'system' %}<|SYSTEM_TOKEN|>"
    "{% else %}<|CHATBOT_TOKEN|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
IMAGE_TOKENS = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
TURN_TOKENS = ["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]


def aya_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
                            "additional_special_tokens": IMAGE_TOKENS + TURN_TOKENS}, replace_extra_special_tokens=False)
    tok.chat_template = AYA_TEMPLATE
    return tok


def save_aya_vision(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 4, max_patches: int = 6,
                    sliding_window: int = 48) -> Path:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    tok = aya_tokenizer()
    text = {"model_type": "cohere2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "logit_scale": 0.25,
            "sliding_window": sliding_window, "layer_types": ["sliding_attention", "full_attention"],
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": tile, "patch_size": patch, "vision_use_head": False}
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2, adapter_layer_norm_eps=1e-6,
                             image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), alignment_intermediate_size=96)
    model = AyaVisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("language_model" in name or "multi_modal_projector" in name):
                # At the default 0.02 every greedy token is the same one, whatever the image; at
                # 0.1 the answer depends on the image (the head is the tied embedding table).
                p.normal_(0, 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norms show a mis-mapped one
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                               max_patches=max_patches, image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch, img_size=tile, downsample_factor=2,
                       chat_template=AYA_TEMPLATE).save_pretrained(folder)
    return Path(folder)


def aya_reference(folder, image, text):
    """What transformers' AyaVisionProcessor (GotOcr2's PIL image processor inside) makes of one
    image before the question: (input ids, pixel values (views, 3, S, S), tiles)."""
    from transformers import AyaVisionProcessor

    proc = AyaVisionProcessor.from_pretrained(folder, local_files_only=True)
    content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    out = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="pt")
    return out["input_ids"][0], out["pixel_values"]


def _parity_reference(folder, image, question, prompt, model):
    ref_ids, ref_pixels = aya_reference(folder, image, question)
    # The image directly before the question gives the same ids as the chat's "<image>\n".
    direct = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" + question)], [image])
    assert direct.input_ids.tolist() == ref_ids.tolist()
    ours = prompt.images[0].pixel_values
    assert ours.shape == ref_pixels.shape
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    std = torch.tensor(model.config.processor.std).view(1, 3, 1, 1)
    assert ((ours - ref_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ref_ids, {"pixel_values": ours}


# Sizes: small (one tile), wide and tall (several tiles + thumbnail), odd, and one that takes the
# most tiles the folder allows (6).
PARITY = ParityCase("aya_vision", save_aya_vision, "AyaVisionForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (90, 30), (24, 100), (71, 45), (200, 130)))
