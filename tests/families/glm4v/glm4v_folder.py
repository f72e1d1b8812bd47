"""A tiny random GLM-4.1V folder, saved with `save_pretrained` and an offline tokenizer (vlmkit's
byte-level one with GLM's role and vision tokens), and its parity case: the same input ids as
Glm4vProcessor's rule (each <|image|> repeated grid_t*grid_h*grid_w / merge^2 times, from
transformers' own Glm4vImageProcessorPil's grids), the same counts and grids, pixels within
docs/preprocessing.md's tolerance; the harness passes vlmkit's M-RoPE positions and checks logits
and greedy tokens against Glm4vForConditionalGeneration."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.tokenizer import byte_level_tokenizer

PIXEL_TOLERANCE = 3 / 255

# GLM-4.1V's chat template, restated: [gMASK]<sop>, role tags, image parts as begin/image/end.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif content['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
           "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]


def glm4v_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL}, replace_extra_special_tokens=False)
    tok.chat_template = GLM4V_TEMPLATE
    return tok


def save_glm4v(folder: Path, *, seed: int = 0, min_pixels: int = 256, max_pixels: int = 16384, tie: bool = False,
               init: float | None = None, moe: bool = False) -> Path:
    """`moe`: GLM-4.5V, 4 routed experts (2 per token) and a shared one after a first dense layer."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    torch.manual_seed(seed)
    tok = glm4v_tokenizer()
    vocab = tok.get_vocab()
    # head_dim 16, half of it rotary: 4 pairs split 2 / 1 / 1 between time, height and width.
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "vocab_size": len(tok),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    # A 6x6 learned position table (image_size 24 / patch 4), resampled to every image's grid.
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4, "image_size": 24,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64}
    if moe:
        text |= {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
                 "first_k_dense_replace": 1, "attention_bias": True}
    config_cls, model_cls = (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if moe else (Glm4vConfig, Glm4vForConditionalGeneration)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=vocab["<|image|>"], video_token_id=vocab["<|video|>"],
                         image_start_token_id=vocab["<|begin_of_image|>"], image_end_token_id=vocab["<|end_of_image|>"],
                         video_start_token_id=vocab["<|begin_of_video|>"], video_end_token_id=vocab["<|end_of_video|>"],
                         tie_word_embeddings=tie)
    if init is not None:
        config.initializer_range = config.text_config.initializer_range = config.vision_config.initializer_range = init
    model = model_cls(config).eval()
    _sharpen(model)
    with torch.no_grad():  # non-trivial norms, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(GLM4V_TEMPLATE)
    Glm4vImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=4, merge_size=2,
                           temporal_patch_size=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    return Path(folder)


def glm4v_reference_ids(folder, images, text):
    """What transformers' Glm4vProcessor produces (it needs torchvision for its video processor):
    the chat template over a content list, each <|image|> repeated grid_t*grid_h*grid_w / merge^2
    times, from Glm4vImageProcessorPil's own grids."""
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = Glm4vImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=images, return_tensors="pt")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<|image|>")
    counts = [int(g.prod()) // proc.merge_size**2 for g in out["image_grid_thw"]]
    expanded = parts[0] + "".join("<|image|>" * n + rest for n, rest in zip(counts, parts[1:]))
    return tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out, counts


def check_against_processor(ref_pixels, counts, prompt, model) -> dict:
    """Counts, grids and pixels against the image processor's output; returns transformers' model
    inputs besides `input_ids`, fed vlmkit's pixels."""
    assert [model.count_image_tokens(im) for im in prompt.images] == counts
    grids = torch.tensor([im.views[0].grid for im in prompt.images])
    assert torch.equal(grids, ref_pixels["image_grid_thw"])
    ours = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std).repeat_interleave(ours.shape[1] // 3)
    assert ((ours - ref_pixels["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return {"pixel_values": ours, "image_grid_thw": grids, "mm_token_type_ids": (prompt.input_ids[None] == model.image_token_id).int()}


def _parity_reference(model_class: str):
    def reference(folder, image, question, prompt, model):
        assert json.loads((Path(folder) / "config.json").read_text())["architectures"] == [model_class]
        ref_ids, ref_pixels, counts = glm4v_reference_ids(folder, [image], question)
        return ref_ids, check_against_processor(ref_pixels, counts, prompt, model)

    return reference


# The image directly before the question, as Glm4vProcessor's content list renders it.
PARITY = (
    ParityCase("glm4v", save_glm4v, "Glm4vForConditionalGeneration", _parity_reference("Glm4vForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (100, 100), (71, 45)), question="Describe the picture.", image_text="<image>"),
    ParityCase("glm4v/glm4v_moe", lambda folder: save_glm4v(folder, moe=True), "Glm4vMoeForConditionalGeneration",
               _parity_reference("Glm4vMoeForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (71, 45)), question="Describe the picture.", image_text="<image>"),
)
