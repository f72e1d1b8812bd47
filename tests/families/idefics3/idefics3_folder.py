"""A tiny random Idefics3 folder, saved with `save_pretrained` (model, `Idefics3Processor` over the
PIL image processor, an offline tokenizer with Idefics3's special tokens and a chat template), and
its parity case: the same input ids and visual-token counts as `Idefics3Processor`, pixels within
docs/preprocessing.md's tolerance, then logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

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


def idefics3_processor(folder: Path):
    """transformers' `Idefics3Processor` over the PIL image processor (the default one needs torchvision)."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3Processor.from_pretrained(folder, local_files_only=True,
                                             image_processor=Idefics3ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                             tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _parity_reference(folder, image, question, prompt, model):
    hf_proc = idefics3_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf_proc.apply_chat_template(conversation, add_generation_prompt=True)
    hf_inputs = hf_proc(images=[image], text=text, return_tensors="pt")
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"][0]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    inputs = dict(hf_inputs, pixel_values=ours_pixels[None])
    return inputs.pop("input_ids")[0], inputs


PARITY = ParityCase("idefics3", save_idefics3, "Idefics3ForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90), (100, 100)), image_text="<image>")
