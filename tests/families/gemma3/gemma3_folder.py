"""A tiny random Gemma 3 folder saved with `save_pretrained` and its processor (the PIL image
processor, pan-and-scan off; an offline byte-level tokenizer plus Gemma 3's special tokens), and
its parity case: the same ids and visual-token count as Gemma3Processor, pixels within
docs/preprocessing.md's tolerance, logits within 1e-4 with each image's tokens attending to each
other (a causal reading differs; a sliding window shorter than the prompt), the same greedy
tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase
from paligemma_folder import check_against_processor, sharpen_gemma

from vlmkit.families.gemma3.hf import with_named_tokens
from vlmkit.tokenizer import byte_level_tokenizer

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
    sharpen_gemma(model)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5, 0.4, 0.3],
                                              image_std=[0.25, 0.3, 0.35])
    Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens_per_image,
                    chat_template=GEMMA3_TEMPLATE).save_pretrained(folder)
    return Path(folder)


def gemma3_processor(folder):
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3Processor.from_pretrained(folder, local_files_only=True,
                                           image_processor=Gemma3ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                           tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def gemma3_inputs(model, folder, prompt, images, question: str) -> dict:
    """Gemma3Processor's inputs for the chat template over the images and `question`, checked
    against vlmkit's prompt (`check_against_processor`), holding vlmkit's pixels."""
    hf_proc = gemma3_processor(folder)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = hf_proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return check_against_processor(model, prompt, hf_proc(images=[images], text=text, return_tensors="pt"), "image")


def _parity_reference(folder, image, question, prompt, model):
    inputs = gemma3_inputs(model, folder, prompt, [image], question)
    return inputs.pop("input_ids")[0], inputs


PARITY = ParityCase("gemma3", save_gemma3, "Gemma3ForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90)), image_text="<image>")
