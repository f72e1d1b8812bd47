"""A tiny random SmolVLM2 folder, saved the way a downloaded one looks: `save_pretrained` weights,
`SmolVLMImageProcessorPil`'s preprocessor_config.json, an offline tokenizer with SmolVLM's special
tokens, SmolVLM2's chat template and processor_config.json. (`SmolVLMProcessor` cannot be built
here: its video processor needs torchvision, and it needs num2words; its image prompt layout is
reproduced with transformers' own `get_image_prompt_string`.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen

from vlmkit.tokenizer import byte_level_tokenizer


def smolvlm_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def save_smolvlm(folder: Path, *, seed: int = 0, crop: int = 32, patch: int = 4, longest_edge: int = 96) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>",
                                                          "<end_of_utterance>", "<video>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": crop,
              "patch_size": patch}
    config = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    model = SmolVLMForConditionalGeneration(config).eval()
    _sharpen(model)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(smolvlm_template())
    SmolVLMImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": crop},
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_seq_len": (crop // patch) ** 2 // 4}))
    return folder


def smolvlm_reference_inputs(folder: Path, images, content: list[dict]):
    """What SmolVLMProcessor gives for one user turn (`content`: image / text parts): the chat
    template rendered, each <image> expanded by transformers' `get_image_prompt_string` with the
    PIL image processor's rows / cols, and that processor's pixel values."""
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = SmolVLMImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=[list(images)], return_row_col_info=True, return_tensors="pt")
    seq = json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_len"]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<image>")
    expanded = parts[0] + "".join(
        get_image_prompt_string(r, c, seq, "<fake_token_around_image>", "<image>", "<global-img>") + rest
        for r, c, rest in zip(out["rows"][0], out["cols"][0], parts[1:]))
    ids = tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, out["pixel_values"]
