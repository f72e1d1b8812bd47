"""A tiny random LFM2-VL folder, saved with `save_pretrained`: a SigLIP2 NaFlex tower, the pixel
unshuffle + LayerNorm + MLP projector, an LFM2 decoder (short-conv and attention layers), an
offline tokenizer (vlmkit's byte-level one with LFM2-VL's image and turn tokens) and the image
processor's settings. transformers' `Lfm2VlImageProcessor` needs torchvision, so its
preprocessor_config.json is written as the processor saves it, and the reference is transformers'
own code of that processor (its module imported with torchvision stubbed out: the layout, tiling,
patch cutting and normalisation are its functions) run on pixels resized by vlmkit's default
resize, which is torch's antialiased uint8 kernel, the one torchvision's resize calls.
`Lfm2VlProcessor` itself needs no torchvision: it expands the image tokens from that output."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.processing.images import Resizer
from vlmkit.tokenizer import byte_level_tokenizer

# ChatML in LFM2-VL's manner (restated, not copied): content lists render an image part as
# "<image>" directly before the text.
LFM2_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
TILE_TAGS = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)]
IMAGE_TOKENS = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>", *TILE_TAGS]

# Toy sizes: 4 px patches, 2x2 merge (8 px per token), 32 px tiles (16 tokens), 4..16 tokens for a
# single view, 2..4 tiles for an image over twice that budget.
SETTINGS = {"downsample_factor": 2, "do_image_splitting": True, "min_tiles": 2, "max_tiles": 4, "use_thumbnail": True,
            "min_image_tokens": 4, "max_image_tokens": 16, "encoder_patch_size": 4, "tile_size": 32, "max_pixels_tolerance": 2.0,
            "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.3, 0.35],
            "do_pad": True, "return_row_col_info": False, "max_num_patches": 64,
            "image_processor_type": "Lfm2VlImageProcessor", "processor_class": "Lfm2VlProcessor"}


def lfm2_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": IMAGE_TOKENS + ["<|im_start|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = LFM2_TEMPLATE
    return tok


def save_lfm2_vl(folder: Path, *, seed: int = 0, layernorm: bool = True) -> Path:
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    torch.manual_seed(seed)
    tok = lfm2_tokenizer()
    text = {"model_type": "lfm2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "conv_L_cache": 3,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"], "block_multiple_of": 32,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "siglip2_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "patch_size": 4, "num_patches": 16, "vision_use_head": False}
    config = Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          projector_hidden_size=80, downsample_factor=2, projector_use_layernorm=layernorm)
    model = Lfm2VlForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("language_model" in name or "multi_modal_projector" in name):
                p.normal_(0, 0.1)  # at 0.02 every greedy token is the same whatever the image
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norms show a mis-mapped one
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(LFM2_TEMPLATE)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(SETTINGS, indent=2))
    (Path(folder) / "processor_config.json").write_text(json.dumps({"processor_class": "Lfm2VlProcessor"}))
    return Path(folder)


def transformers_image_processor_module():
    """transformers' image_processing_lfm2_vl, imported with torchvision stubbed (its module names
    torchvision at the top, for the resize and type hints only)."""
    name = "transformers.models.lfm2_vl.image_processing_lfm2_vl"
    if name in sys.modules:
        return sys.modules[name]
    stubs = {m: types.ModuleType(m) for m in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                                               "torchvision.transforms.v2.functional")}
    saved = {m: sys.modules.get(m) for m in stubs}
    sys.modules.update(stubs)
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old


def _layout_kwargs(s: dict) -> dict:
    keys = ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens", "max_image_tokens", "encoder_patch_size",
            "tile_size", "max_pixels_tolerance")
    out = {k: s[k] for k in keys}
    if not s["do_image_splitting"]:
        out["min_tiles"] = out["max_tiles"] = 1
    return out


def lfm2_reference(folder, image, settings: dict | None = None):
    """transformers' Lfm2VlImageProcessor rule on one image: (rows, cols, the views as
    (views, max_patches, p*p*3) patches padded as it pads them, their (h, w) patch grids, the
    pixel mask, the single view's or thumbnail's (height, width)). Its own layout, tiling, patch
    cutting and fused normalisation; the resize is vlmkit's default one (see the module notes)."""
    from transformers.image_transforms import split_to_tiles

    module = transformers_image_processor_module()
    s = settings or json.loads((Path(folder) / "preprocessor_config.json").read_text())
    proc = object.__new__(module.Lfm2VlImageProcessor)  # its layout methods read no state
    kw = _layout_kwargs(s)
    width, height = image.size
    do_split, rows, cols, new_h, new_w = proc._get_split_layout(height, width, **kw)
    resizer = Resizer(image, "bilinear", "torch")
    views = []
    if do_split:
        gw, gh, tw, th, _ = proc._get_grid_layout(height, width, kw["min_tiles"], kw["max_tiles"], kw["tile_size"])
        views += list(split_to_tiles(resizer.resize(th, tw)[None], num_tiles_height=gh, num_tiles_width=gw)[0])
        if s["use_thumbnail"]:
            views.append(resizer.resize(new_h, new_w))
    else:
        views.append(resizer.resize(new_h, new_w))
    mean = torch.tensor(s["image_mean"]) * (1 / s["rescale_factor"])
    std = torch.tensor(s["image_std"]) * (1 / s["rescale_factor"])
    p = s["encoder_patch_size"]
    max_patches = max(s["max_image_tokens"] * s["downsample_factor"] ** 2, (s["tile_size"] // p) ** 2)
    flats = [module.convert_image_to_patches(((v.float() - mean[:, None, None]) / std[:, None, None])[None], p) for v in views]
    # A very thin image's view can hold more patches than max_num_patches; transformers' pad then
    # leaves it longer than the rest (and its processor cannot stack the batch): pad to the longest.
    longest = max(max_patches, *(f.shape[1] for f in flats))
    patches, masks = zip(*(module.pad_along_first_dim(f, longest) for f in flats))
    shapes = [[v.shape[-2] // p, v.shape[-1] // p] for v in views]
    return rows, cols, torch.cat(patches), torch.tensor(shapes), torch.stack(masks), (new_h, new_w)


def lfm2_reference_ids(folder, image, text, settings: dict | None = None):
    """transformers' Lfm2VlProcessor text for one image before the question: its chat template over
    the content list, the image token expanded by its own `_build_image_tokens` and token counts."""
    from transformers import AutoTokenizer, Lfm2VlProcessor

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    s = settings or json.loads((Path(folder) / "preprocessor_config.json").read_text())
    rows, cols, _, _, _, size = lfm2_reference(folder, image, s)
    proc = object.__new__(Lfm2VlProcessor)  # its token helpers read only the tag names
    proc.image_token, proc.image_start_token, proc.image_end_token = "<image>", "<|image_start|>", "<|image_end|>"
    proc.image_thumbnail_token = "<|img_thumbnail|>"
    p, f = s["encoder_patch_size"], s["downsample_factor"]
    per_tile = proc._compute_tokens_per_tile(s["tile_size"], p, f)
    whole = proc._compute_tokens_for_image(list(size), p, f)
    expansion = proc._build_image_tokens(rows, cols, per_tile, whole, s["use_thumbnail"], True)
    content = [{"type": "image"}, {"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert rendered.count("<image>") == 1
    return tok(rendered.replace("<image>", expansion), add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _parity_reference(folder, image, question, prompt, model):
    ref_ids = lfm2_reference_ids(folder, image, question)
    _, _, patches, shapes, mask, _ = lfm2_reference(folder, image)
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    tower = model.vision
    ours = [tower.patches(v[None])[0] for v in prompt.images[0].view_pixels()]
    assert [tuple(s) for s in shapes.tolist()] == [tower.grid_hw(*v.size) for v in prompt.images[0].views]
    for k, o in enumerate(ours):
        torch.testing.assert_close(o, patches[k, : o.shape[0]], atol=1e-5, rtol=0)
    return ref_ids, {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}


# Sizes: a small single view (upscaled to the token floor), one within budget, a wide and a tall
# tiled one (2 and 3 tiles + thumbnail), an odd one, and 4 tiles.
PARITY = ParityCase("lfm2_vl", save_lfm2_vl, "Lfm2VlForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (40, 24), (90, 30), (30, 100), (71, 45), (120, 110)), image_text="<image>")
