"""A tiny random Qwen2-VL (or Qwen2.5-VL) folder, saved with `save_pretrained` and an offline
tokenizer (vlmkit's byte-level one with Qwen2-VL's vision tokens), and its parity cases: the same
input ids and visual-token counts as Qwen2VLProcessor's rule, the same patch grids, pixels within
docs/preprocessing.md's tolerance; the harness passes vlmkit's M-RoPE positions
(`prompt.position_ids`) and checks logits and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# Qwen2-VL's chat template, restated: a default system turn, content lists with image parts
# rendered as vision-start / image-pad / vision-end, plain string contents as they are.
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2vl_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = QWEN2VL_TEMPLATE
    return tok


def save_qwen2vl(folder: Path, *, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                 min_pixels: int = 256, max_pixels: int = 16384, version: str = "2") -> Path:
    """`version="2.5"`: a Qwen2.5-VL folder (windowed-attention tower, RMSNorm merger)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = qwen2vl_tokenizer()
    vocab = tok.get_vocab()
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    if version == "2.5":
        # Window of 16 px = 2x2 merge units of 4 px patches: several windows per image; block 1 attends fully.
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4, "temporal_patch_size": 2,
                  "spatial_merge_size": 2, "window_size": 16, "fullatt_block_indexes": [1], "out_hidden_size": text["hidden_size"],
                  **(vision or {})}
    else:
        vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4, "temporal_patch_size": 2,
                  "spatial_merge_size": 2, "hidden_size": text["hidden_size"], **(vision or {})}
    config_cls, model_cls = ((Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration) if version == "2.5"
                             else (Qwen2VLConfig, Qwen2VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"])
    model = model_cls(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=vision["patch_size"],
                             merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    return Path(folder)


def qwen_reference_ids(folder, images, text):
    """What transformers' Qwen2VLProcessor produces (it cannot be built here without
    torchvision): the chat template over a content list, each <|image_pad|> repeated
    grid_t*grid_h*grid_w / merge^2 times, from the HF image processor's own grids."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=images, return_tensors="pt")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<|image_pad|>")
    counts = [int(g.prod()) // proc.merge_size**2 for g in out["image_grid_thw"]]
    expanded = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    return tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out, counts


def check_against_processor(ref_pixels, counts, prompt, model) -> dict:
    """The checks beyond the ids against the image processor's output (`qwen_reference_ids`):
    visual-token counts, patch grids and pixels. Returns transformers' model inputs besides
    `input_ids`, fed vlmkit's pixels."""
    assert [model.count_image_tokens(im) for im in prompt.images] == counts
    grids = torch.tensor([im.views[0].grid for im in prompt.images])
    assert torch.equal(grids, ref_pixels["image_grid_thw"])
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std).repeat_interleave(ours_pixels.shape[1] // 3)
    assert ((ours_pixels - ref_pixels["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return {"pixel_values": ours_pixels, "image_grid_thw": grids,
            "mm_token_type_ids": (prompt.input_ids[None] == model.image_token_id).int()}


def _parity_reference(model_class: str):
    def reference(folder, image, question, prompt, model):
        # transformers' auto class picks this model class for the folder.
        assert json.loads((Path(folder) / "config.json").read_text())["architectures"] == [model_class]
        ref_ids, ref_pixels, counts = qwen_reference_ids(folder, [image], question)
        return ref_ids, check_against_processor(ref_pixels, counts, prompt, model)

    return reference


# The image directly before the question, as Qwen2VLProcessor's content list renders it.
PARITY = (
    ParityCase("qwen2_vl", save_qwen2vl, "Qwen2VLForConditionalGeneration", _parity_reference("Qwen2VLForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (100, 100)), question="Describe the picture.", image_text="<image>"),
    ParityCase("qwen2_vl/qwen2_5_vl", lambda folder: save_qwen2vl(folder, version="2.5"), "Qwen2_5_VLForConditionalGeneration",
               _parity_reference("Qwen2_5_VLForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (100, 100)), question="Describe the picture.", image_text="<image>"),
)


def check_image_and_video_prompt(model, ref, video) -> None:
    """An image and a video in one prompt against transformers' M-RoPE model `ref`: the same
    M-RoPE positions (get_rope_index) and logits (fp32, atol 1e-4)."""
    from PIL import Image

    from vlmkit.data.formats import Message
    from vlmkit.processing import build_chat_processor
    from vlmkit.processing.base import VisualBatch
    from vlmkit.processing.video import VideoInput

    image = Image.new("RGB", (40, 28), (30, 160, 90))
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image><video>Same colours?")],
                                                             [image, VideoInput(video)])
    image_group, video_group = prompt.images
    ids = prompt.input_ids[None]
    video_id = model.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    mm_types = (ids == model.image_token_id).int() + (ids == video_id).int() * 2
    kw = {"pixel_values": image_group.pixel_values, "image_grid_thw": torch.tensor([list(image_group.views[0].grid)]),
          "pixel_values_videos": video_group.pixel_values, "video_grid_thw": torch.tensor([list(video_group.views[0].grid)]),
          "mm_token_type_ids": mm_types}
    positions, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=kw["image_grid_thw"],
                                            video_grid_thw=kw["video_grid_thw"])
    assert torch.equal(prompt.position_ids, positions[:, 0])
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        theirs = ref(input_ids=ids, **kw).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
