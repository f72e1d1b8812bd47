"""A tiny random LLaVA-NeXT-Video folder, saved with `save_pretrained` (model, PIL image
processor, tokenizer, chat template, video_preprocessor_config.json, processor_config.json), and
its parity case on images: the same input ids and visual-token counts as LLaVA-NeXT's processor
rule (LlavaNextVideoProcessor's image path is LlavaNextProcessor's), pixels within
docs/preprocessing.md's tolerance. Video prompts: test_llava_next_video.py.

LlavaNextVideoProcessor cannot be built here (its video processor needs torchvision), so the
references run its own `replace_image_token` / `replace_video_token` on an instance holding the
folder's settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.families.llava_next_video.hf import next_video_inputs
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.3, 0.35]

# Content lists only: image parts become "<image>\n", video parts "<video>\n".
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_next_video(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 8, frame: int = 32, mode: str = "average",
                    num_frames: int = 4) -> Path:
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": tile, "patch_size": patch}
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                                  vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                                  spatial_pool_mode=mode, spatial_pool_stride=2)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.image_newline.normal_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                               image_mean=MEAN, image_std=STD).save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": frame},
        "crop_size": {"height": frame, "width": frame}, "image_mean": MEAN, "image_std": STD, "resample": 3,
        "do_center_crop": True, "do_sample_frames": True, "num_frames": num_frames}))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaNextVideoProcessor", "patch_size": patch, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": "<image>", "video_token": "<video>"}))
    return folder


def reference_processor(folder: Path):
    """LlavaNextVideoProcessor's token rules over the folder's settings (no video processor)."""
    from transformers import AutoTokenizer, LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    settings = json.loads((Path(folder) / "processor_config.json").read_text())
    proc = object.__new__(LlavaNextVideoProcessor)
    proc.image_processor = LlavaNextImageProcessorPil.from_pretrained(folder, local_files_only=True)
    proc.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token", "video_token"):
        setattr(proc, key, settings[key])
    return proc


def reference_ids(folder: Path, content: list[dict], images=(), frames: torch.Tensor | None = None):
    """transformers' input ids for one user turn, and the PIL image processor's outputs."""
    proc = reference_processor(folder)
    rendered = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    out = proc.image_processor(images=list(images), return_tensors="pt") if images else {}
    parts = rendered.split("<image>")
    rendered = parts[0] + "".join(proc.replace_image_token(out, i) + rest for i, rest in enumerate(parts[1:]))
    if frames is not None:
        rendered = rendered.replace("<video>", proc.replace_video_token({"pixel_values_videos": frames[None].numpy()}, 0))
    return proc.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out


def _parity_reference(folder, image, question, prompt, model):
    ids, hf = reference_ids(folder, [{"type": "image"}, {"type": "text", "text": question}], [image])
    assert model.count_image_tokens(prompt.images[0]) == int((ids == model.image_token_id).sum())
    inputs = next_video_inputs(prompt)
    views = inputs["pixel_values"].shape[1]
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((inputs["pixel_values"] - hf["pixel_values"][:, :views]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    assert inputs["image_sizes"].tolist() == hf["image_sizes"].tolist()
    return ids, inputs


PARITY = ParityCase("llava_next_video", save_next_video, "LlavaNextVideoForConditionalGeneration", _parity_reference,
                    sizes=((72, 40), (24, 90), (64, 64), (101, 31)))
