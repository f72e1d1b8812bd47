"""A tiny random Idefics2 folder saved with `save_pretrained` (model, `Idefics2Processor` over the
PIL image processor, an offline tokenizer with Idefics2's special tokens, Idefics2's chat
template), the way a downloaded one looks."""

from __future__ import annotations

from pathlib import Path

import torch
from _hf_folders import _sharpen

from vlmkit.tokenizer import byte_level_tokenizer

# HuggingFaceM4/idefics2-8b's template: content lists only, "User:" before a leading image part.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def save_idefics2(folder: Path, *, seed: int = 0, shortest: int = 32, longest: int = 64, patch: int = 4, latents: int = 8,
                  split: bool = False) -> Path:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]},
                           replace_extra_special_tokens=False)
    text = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "rms_norm_eps": 1e-5,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": longest,
              "patch_size": patch}
    perceiver = {"hidden_size": 64, "resampler_n_latents": latents, "resampler_depth": 2, "resampler_n_heads": 4,
                 "resampler_head_dim": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = Idefics2ForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": shortest, "longest_edge": longest}, do_image_splitting=split,
                                                image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=latents,
                      chat_template=IDEFICS2_TEMPLATE).save_pretrained(folder)
    return folder


def idefics2_processor(folder: Path):
    from transformers import AutoTokenizer, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2Processor.from_pretrained(folder, local_files_only=True,
                                             image_processor=Idefics2ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                             tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
