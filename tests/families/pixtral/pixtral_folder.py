"""Tiny random Pixtral (LLaVA with a Pixtral tower) and Mistral3 folders, saved with
`save_pretrained` and an offline tokenizer, as a downloaded folder looks. transformers'
`PixtralProcessor` needs torchvision, so its settings are written to processor_config.json by
hand (the keys `PixtralProcessor.save_pretrained` writes) next to the PIL image processor's
preprocessor_config.json.

Their parity cases: the input ids and [IMG] counts transformers' PixtralProcessor builds
(restated: it needs torchvision), the resized sizes, pixels within docs/preprocessing.md's
tolerance, on wide, tall and downscaled images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.hf.registry import family_of
from vlmkit.tokenizer import byte_level_tokenizer

PIXEL_TOLERANCE = 3 / 255  # docs/preprocessing.md (torch backend)

# Mistral's [INST] format over content lists (image parts -> [IMG]); plain strings pass through.
PIXTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}[IMG]{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def pixtral_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = PIXTRAL_TEMPLATE
    return tok


def _text(tok) -> dict:
    return {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "vocab_size": len(tok), "rms_norm_eps": 1e-5,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _vision(patch: int, longest: int) -> dict:
    return {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "patch_size": patch, "image_size": longest, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}


def _save(model, tok, folder: Path, patch: int, merge: int, longest: int) -> Path:
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(PIXTRAL_TEMPLATE)
    PixtralImageProcessorPil(size={"longest_edge": longest}, patch_size=patch, image_mean=[0.5, 0.4, 0.3],
                             image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    (Path(folder) / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": merge, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=2))
    return Path(folder)


def save_pixtral(folder: Path, *, seed: int = 0, patch: int = 4, longest: int = 64) -> Path:
    """LlavaForConditionalGeneration with a Pixtral tower (model_type llava), as pixtral-12b."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = pixtral_tokenizer()
    config = LlavaConfig(vision_config=_vision(patch, longest), text_config=_text(tok), image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    return _save(model, tok, folder, patch, 1, longest)


def save_mistral3(folder: Path, *, seed: int = 0, patch: int = 4, longest: int = 64, bias: bool = False, tied: bool = False) -> Path:
    """Mistral3ForConditionalGeneration (Mistral-Small-3.1's layout): Pixtral tower, RMSNorm,
    2x2 patch merger, MLP projector (bias-free, as released)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    tok = pixtral_tokenizer()
    config = Mistral3Config(vision_config=_vision(patch, longest), text_config=_text(tok), image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                            spatial_merge_size=2, vision_feature_layer=-1, multimodal_projector_bias=bias,
                            tie_word_embeddings=tied)  # untied as released (Mistral-Small-3.1); Mistral3Config's default ties
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.norm.weight.uniform_(0.5, 1.5)
    return _save(model, tok, folder, patch, 2, longest)


def _expansion(height: int, width: int, unit: int) -> str:
    """transformers' `PixtralProcessor.replace_image_token` (its module needs torchvision, so it
    is restated): per row of `unit`-px blocks, one [IMG] per block and [IMG_BREAK]; the last
    break becomes [IMG_END]."""
    tokens = (["[IMG]"] * (width // unit) + ["[IMG_BREAK]"]) * (height // unit)
    tokens[-1] = "[IMG_END]"
    return "".join(tokens)


def pixtral_reference(folder, images, text):
    """What transformers' PixtralProcessor produces (it needs torchvision, so it is not built
    here): the chat template over a content list, each [IMG] expanded from the PIL image
    processor's resized sizes, at patch * merge as the processor calls it."""
    from transformers import AutoTokenizer
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    settings = json.loads((Path(folder) / "processor_config.json").read_text())
    unit = settings["patch_size"] * settings["spatial_merge_size"]
    out = PixtralImageProcessorPil.from_pretrained(folder, local_files_only=True)(images=images, patch_size=unit, return_tensors="pt")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("[IMG]")
    assert len(parts) == len(images) + 1
    expanded = parts[0] + "".join(_expansion(*out["image_sizes"][i].tolist(), unit) + rest for i, rest in enumerate(parts[1:]))
    return tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out


def check_pixels(prompt, ref_px, model) -> torch.Tensor:
    """vlmkit's pixels at transformers' resized sizes and within tolerance of its pixels; returned
    padded as transformers pads a batch (bottom-right, to the largest)."""
    std = torch.tensor(model.config.processor.std)[:, None, None]
    for im, theirs, (h, w) in zip(prompt.images, ref_px["pixel_values"], ref_px["image_sizes"].tolist()):
        ours = im.pixel_values[0]
        assert ours.shape[-2:] == (h, w)
        assert ((ours - theirs[:, :h, :w]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    pixels = torch.zeros_like(ref_px["pixel_values"])
    for i, im in enumerate(prompt.images):
        pixels[i, :, : im.pixel_values.shape[-2], : im.pixel_values.shape[-1]] = im.pixel_values[0]
    return pixels


def _parity_reference(name: str):
    def reference(folder, image, question, prompt, model):
        ref_ids, ref_px = pixtral_reference(folder, [image], question)
        assert sum(model.count_image_tokens(im) for im in prompt.images) == int((ref_ids == model.image_token_id).sum())
        assert family_of(model) == name
        return ref_ids, {"pixel_values": check_pixels(prompt, ref_px, model), "image_sizes": ref_px["image_sizes"]}

    return reference


_SIZES = ((72, 40), (24, 90), (100, 100))  # wide, tall, downscaled
PARITY = (
    ParityCase("pixtral", save_pixtral, "LlavaForConditionalGeneration", _parity_reference("llava"), sizes=_SIZES,
               question="Describe the picture.", image_text="<image>"),
    ParityCase("pixtral/mistral3", save_mistral3, "Mistral3ForConditionalGeneration", _parity_reference("mistral3"), sizes=_SIZES,
               question="Describe the picture.", image_text="<image>"),
)
