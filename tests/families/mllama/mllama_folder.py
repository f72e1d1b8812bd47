"""A tiny random Llama 3.2 Vision folder (`MllamaForConditionalGeneration`), saved with
`save_pretrained`, its processor (`MllamaProcessor` with the PIL image processor) and an offline
tokenizer whose `<|image|>` lies just past the LM head's vocabulary, as in the released models
(the embedding table has 8 extra rows for it); and its parity case: the input ids, aspect-ratio
ids / masks and cross_attention_mask transformers' MllamaProcessor builds, and pixel values within
docs/preprocessing.md's tolerance, on wide, tall, large and small images (two and interleaved
images: tests/families/mllama/test_mllama.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.families.mllama.hf import reference_inputs
from vlmkit.tokenizer import byte_level_tokenizer

PIXEL_TOLERANCE = 3 / 255  # docs/preprocessing.md (torch backend)

MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def mllama_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
                           replace_extra_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = MLLAMA_TEMPLATE
    return tok


def save_mllama(folder: Path, *, seed: int = 0, tile: int = 16, patch: int = 4, max_tiles: int = 4) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    torch.manual_seed(seed)
    tok = mllama_tokenizer()
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tok) - 1
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "cross_attention_layers": [1], "vocab_size": image_id, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 2,
              "image_size": tile, "patch_size": patch, "max_num_tiles": max_tiles, "intermediate_layers_indices": [0],
              "vision_output_dim": 64}
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() <= 64:  # the tanh gates start at 0: open them so images matter
                p.uniform_(0.5, 1.0)
            elif name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles,
                                              image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MLLAMA_TEMPLATE).save_pretrained(folder)
    return Path(folder)


def hf_processor(folder):
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaProcessor.from_pretrained(folder, local_files_only=True,
                                           image_processor=MllamaImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                           tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def check_inputs(folder, images, content, prompt, model) -> tuple[torch.Tensor, dict]:
    """Asserts vlmkit's prompt matches what MllamaProcessor builds for the user turn `content`
    (ids, aspect-ratio ids and masks, cross_attention_mask, pixels); returns transformers' ids and
    its inputs for the prompt (besides `input_ids`), with vlmkit's pixels."""
    hf_proc = hf_processor(folder)
    text = hf_proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    hf = hf_proc(images=[images], text=text, return_tensors="pt")
    assert prompt.input_ids.tolist() == hf["input_ids"][0].tolist()
    inputs = reference_inputs(model, prompt.images, prompt.input_ids[None])
    for key in ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        assert torch.equal(inputs[key], hf[key]), key
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((inputs["pixel_values"] - hf["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return hf["input_ids"][0], inputs


def _parity_reference(folder, image, question, prompt, model):
    return check_inputs(folder, [image], [{"type": "image"}, {"type": "text", "text": question}], prompt, model)


PARITY = ParityCase("mllama", save_mllama, "MllamaForConditionalGeneration", _parity_reference,
                    sizes=((72, 40), (24, 90), (100, 100), (10, 12)), image_text="<image>")
