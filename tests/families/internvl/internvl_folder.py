"""A tiny random InternVL folder (transformers' port), saved with `save_pretrained` and an offline
tokenizer (vlmkit's byte-level one plus `<img>`, `</img>`, `<IMG_CONTEXT>`), and its parity case:
the same input ids and visual-token counts as `InternVLProcessor` (restated: it needs
torchvision), pixels within docs/preprocessing.md's tolerance, on one-tile and tiled sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

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


def internvl_reference_ids(folder, image, text):
    """What transformers' InternVLProcessor produces (it cannot be built here without torchvision,
    which its video processor needs): the chat template over a content list, each <IMG_CONTEXT>
    replaced by <img> + image_seq_length * num_patches context tokens + </img>, with num_patches
    from GotOcr2's (PIL) image processor."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = GotOcr2ImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=[image], return_tensors="pt")
    seq = json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_length"]
    content = [{"type": "image"}, {"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    n = int(out["num_patches"][0])
    rendered = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * (seq * n) + "</img>", 1)
    return tok(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out


def _parity_reference(folder, image, question, prompt, model):
    ref_ids, ref_pixels = internvl_reference_ids(folder, image, question)
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - ref_pixels["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ref_ids, {"pixel_values": ours_pixels}


PARITY = ParityCase("internvl", save_internvl, "InternVLForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90), (100, 100)))
