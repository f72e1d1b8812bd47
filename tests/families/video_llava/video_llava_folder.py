"""A tiny random Video-LLaVA folder, saved with `save_pretrained` (model, VideoLlavaImageProcessor,
tokenizer, chat template, video_preprocessor_config.json, processor_config.json), and its parity
case on images: the same input ids and visual-token counts as VideoLlavaProcessor's rule, pixels
within docs/preprocessing.md's tolerance of VideoLlavaImageProcessor's. Video prompts:
test_video_llava.py.

VideoLlavaProcessor cannot be built here (its video processor needs torchvision), so the
references run its own `replace_image_token` / `replace_video_token` on an instance holding the
folder's settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.families.video_llava.hf import video_llava_inputs
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.3, 0.35]

# Content lists only: image parts become "<image>\n", video parts "<video>\n".
TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_video_llava(folder: Path, *, seed: int = 0, size: int = 32, patch: int = 8, num_frames: int = 4) -> Path:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": size, "patch_size": patch}
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                              video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                              vision_feature_select_strategy="default")
    model = VideoLlavaForConditionalGeneration(config).eval()
    _sharpen(model)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    VideoLlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=MEAN,
                             image_std=STD).save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "VideoLlavaVideoProcessor", "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
        "image_mean": MEAN, "image_std": STD, "resample": 3, "do_center_crop": True, "do_sample_frames": True, "num_frames": num_frames}))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "VideoLlavaProcessor", "patch_size": patch, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": "<image>", "video_token": "<video>"}))
    return folder


def image_processor(folder: Path):
    from transformers import VideoLlavaImageProcessor

    return VideoLlavaImageProcessor.from_pretrained(folder, local_files_only=True)


def reference_ids(folder: Path, content: list[dict], images=(), frames: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' input ids for one user turn."""
    from transformers import AutoTokenizer, VideoLlavaProcessor

    settings = json.loads((Path(folder) / "processor_config.json").read_text())
    proc = object.__new__(VideoLlavaProcessor)
    proc.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token", "video_token"):
        setattr(proc, key, settings[key])
    rendered = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if images:
        pixels = image_processor(folder)(images=list(images), return_tensors="np", return_legacy_image_output=False)
        rendered = rendered.replace("<image>", proc.replace_image_token({"pixel_values": pixels["pixel_values"]}, 0))
    if frames is not None:
        rendered = rendered.replace("<video>", proc.replace_video_token({"pixel_values_videos": frames[None].numpy()}, 0))
    return proc.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _parity_reference(folder, image, question, prompt, model):
    ids = reference_ids(folder, [{"type": "image"}, {"type": "text", "text": question}], [image])
    assert model.count_image_tokens(prompt.images[0]) == int((ids == model.image_token_id).sum())
    theirs = image_processor(folder)(images=[image], return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    inputs = video_llava_inputs(prompt)
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert inputs["pixel_values"].shape == theirs.shape
    assert ((inputs["pixel_values"] - theirs).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ids, inputs


PARITY = ParityCase("video_llava", save_video_llava, "VideoLlavaForConditionalGeneration", _parity_reference,
                    sizes=((72, 40), (24, 90), (64, 64), (101, 31)))
