"""A tiny random LLaVA-1.5 folder (a CLIP tower read at its penultimate layer, CLS dropped, the
2-layer GELU projector, a Llama LM), saved with `save_pretrained` and an offline tokenizer
(vlmkit's byte-level one plus `<image>`), with `LlavaProcessor` over the PIL image processor
padding to a square with the mean colour; and its parity case: the same input ids and
visual-token counts as that processor, pixels within docs/preprocessing.md's tolerance, on wide,
tall and square images."""

from __future__ import annotations

from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# A LLaVA-style processor template over content lists (image parts become "<image>\n").
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llava_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return tok


def save_llava(folder: Path, *, seed: int = 0, size: int = 32, patch: int = 8) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    torch.manual_seed(seed)
    tok = llava_tokenizer()
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": size, "patch_size": patch}
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2)
    model = LlavaForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    # Pad colours: LLaVA truncates mean * 255, vlmkit's fixed processor rounds; these means agree under both.
    image_processor = LlavaImageProcessorPil(do_pad=True, size={"height": size, "width": size}, do_center_crop=False,
                                             image_mean=[0.4, 0.3, 0.2], image_std=[0.2, 0.3, 0.25])
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                   chat_template=LLAVA_TEMPLATE, image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return Path(folder)


def llava_processor(folder):
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    # The PIL image processor: the default one needs torchvision.
    return LlavaProcessor.from_pretrained(folder, local_files_only=True,
                                          image_processor=LlavaImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                          tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _parity_reference(folder, image, question, prompt, model):
    hf_proc = llava_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    hf_inputs = hf_proc(images=image, text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return hf_inputs["input_ids"][0], {"attention_mask": hf_inputs["attention_mask"], "pixel_values": ours_pixels}


PARITY = ParityCase("llava", save_llava, "LlavaForConditionalGeneration", _parity_reference,
                    sizes=((72, 40), (24, 90), (32, 32), (50, 30)))
