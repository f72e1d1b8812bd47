"""A tiny random Ovis2 folder, saved with `save_pretrained`: Ovis2's AIMv2-style ViT, its visual
tokenizer (a head to logits over a visual vocabulary, softmax, a weighted sum of the visual
embedding table, whose last rows embed the image-structure tokens), a Qwen2 decoder, Ovis2's PIL
image processor (covering-area tiles + thumbnail first) and `Ovis2Processor` with an offline
tokenizer (vlmkit's byte-level one with Ovis2's image and turn tokens), and its parity case: the
same input ids as Ovis2Processor's chat template (structure tokens, atoms), the same views and
pixels as its PIL image processor (within the pixel tolerance of vlmkit's default resize), on
one-tile, wide, tall, odd and many-tile images."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# A Qwen2-style chat template in Ovis2's manner (restated, not copied): an image part renders as
# "<image>" and a newline before the text.
OVIS2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# In the order of the visual table's last rows (Ovis2's visual_indicator_token_ids).
INDICATORS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
IMAGE_TOKENS = ["<image>", "<IMG_ATOM>", *INDICATORS]


def ovis2_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": IMAGE_TOKENS + ["<|im_start|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = OVIS2_TEMPLATE
    return tok


def save_ovis2(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 4, max_patches: int = 6, stride: int = 2) -> Path:
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    torch.manual_seed(seed)
    tok = ovis2_tokenizer()
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "tie_word_embeddings": True,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": tile,
              "patch_size": patch, "vocab_size": 96, "hidden_stride": stride, "num_visual_indicator_tokens": len(INDICATORS)}
    config = Ovis2Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
                         visual_indicator_token_ids=tok.convert_tokens_to_ids(INDICATORS), vocab_size=len(tok), hidden_size=64,
                         tie_word_embeddings=True)
    model = Ovis2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "vision_tower.transformer" not in name:
                # At the default 0.02 every greedy token is the same one, whatever the image.
                p.normal_(0, 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norms show a mis-mapped one
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Ovis2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                            max_patches=max_patches, image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    Ovis2Processor(image_processor=image_processor, tokenizer=tok, chat_template=OVIS2_TEMPLATE,
                   image_seq_length=(tile // patch // stride) ** 2).save_pretrained(folder)
    return Path(folder)


def ovis2_reference(folder, image, text):
    """What transformers' Ovis2Processor (its PIL image processor inside) makes of one image before
    the question: (input ids, pixel values (views, 3, S, S), grids)."""
    from transformers import Ovis2Processor

    proc = Ovis2Processor.from_pretrained(folder, local_files_only=True)
    content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    out = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="pt")
    return out["input_ids"][0], out["pixel_values"]


def _parity_reference(folder, image, question, prompt, model):
    ref_ids, ref_pixels = ovis2_reference(folder, image, question)
    ours = prompt.images[0].pixel_values
    assert ours.shape == ref_pixels.shape
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    std = torch.tensor(model.config.processor.std).view(1, 3, 1, 1)
    assert ((ours - ref_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ref_ids, {"pixel_values": ours}


# Sizes: small (one tile), wide and tall (several tiles + thumbnail), odd, and one that takes many tiles.
PARITY = ParityCase("ovis2", save_ovis2, "Ovis2ForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (90, 30), (24, 100), (71, 45), (200, 130)))
