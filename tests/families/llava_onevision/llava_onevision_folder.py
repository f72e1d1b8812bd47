"""A tiny random LLaVA-OneVision folder, saved with `save_pretrained` (model, PIL image processor,
tokenizer, chat template, processor_config.json), the way a downloaded one looks, and its parity
case: the same input ids and visual-token counts as `LlavaOnevisionProcessor`, pixels within
docs/preprocessing.md's tolerance and the same image sizes, on sizes below and above the
anyres_max cap. Its processor class cannot be built here from the folder (the video processor
needs torchvision), so the reference runs its `replace_image_token` around the PIL image
processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase
from llava_next_folder import LLAVA_NEXT_TEMPLATE

from vlmkit.families.llava_onevision.hf import onevision_inputs
from vlmkit.hf.registry import family_of
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def save_onevision(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 8, max_tiles: int = 4, tower: str = "siglip") -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[tower]
    vision = {"model_type": model_type, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": tile, "patch_size": patch}
    pinpoints = [[tile * i, tile * j] for i in range(1, 5) for j in range(1, 5)]
    strategy = "default" if tower == "clip" else "full"
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy=strategy, image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}")
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.image_newline.normal_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(LLAVA_NEXT_TEMPLATE)
    LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (tile // patch) ** 2 + (tower == "clip"),
        "vision_feature_select_strategy": strategy, "vision_aspect_ratio": f"anyres_max_{max_tiles}", "image_token": "<image>",
        "video_token": "<video>"}))
    return folder


def onevision_reference_inputs(folder: Path, images, content: list[dict]):
    """What LlavaOnevisionProcessor gives for one user turn (`content`: image / text parts). The
    processor cannot be constructed here (its video processor slot needs torchvision), so its own
    `replace_image_token` runs on an instance holding the folder's settings, over the PIL image
    processor's outputs: (input_ids, image processor outputs)."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    settings = json.loads((Path(folder) / "processor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(folder, local_files_only=True)
    proc.num_image_tokens = settings["num_image_tokens"]
    proc.vision_feature_select_strategy = settings["vision_feature_select_strategy"]
    proc.vision_aspect_ratio = settings["vision_aspect_ratio"]
    proc.image_token = settings["image_token"]
    out = proc.image_processor(images=[list(images)], return_tensors="pt")
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<image>")
    expanded = parts[0] + "".join(proc.replace_image_token(out, i) + rest for i, rest in enumerate(parts[1:]))
    return tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"], out


def check_inputs(folder, images, content, prompt, model) -> tuple[torch.Tensor, dict]:
    """transformers' input ids for the prompt, and its model inputs fed vlmkit's pixels once they
    are checked against the PIL image processor's (counts, pixels, image sizes)."""
    ids, hf = onevision_reference_inputs(folder, images, content)
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((ids == model.image_token_id).sum())
    inputs = onevision_inputs(prompt)
    views = inputs["pixel_values"].shape[1]
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((inputs["pixel_values"] - hf["pixel_values"][:, :views]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    assert inputs["image_sizes"].tolist() == hf["image_sizes"].tolist()
    return ids, inputs


def _parity_reference(folder, image, question, prompt, model):
    assert family_of(model) == "llava_onevision"
    ids, inputs = check_inputs(folder, [image], [{"type": "image"}, {"type": "text", "text": question}], prompt, model)
    return ids[0], inputs


# (20, 20): one tile; (72, 40), (24, 90): below the anyres_max_4 cap; (100, 100), (130, 60): above it.
PARITY = ParityCase("llava_onevision", save_onevision, "LlavaOnevisionForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90), (100, 100), (130, 60)))
