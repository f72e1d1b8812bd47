"""A tiny random Llama 4 folder, saved with `save_pretrained`: its ViT with the pixel-shuffle
adapter, the bias-free projector, a mixture-of-experts decoder (4 experts, top-1, a shared expert,
MoE on every second layer, chunked attention of 16 tokens on the RoPE layers, a no-RoPE layer),
an offline tokenizer (vlmkit's byte-level one with Llama 4's image and header tokens) and the
image processor's settings. transformers' `Llama4ImageProcessor` needs torchvision, so its
preprocessor_config.json is written as it saves it, and the reference is transformers' own code of
that processor (its module imported with torchvision stubbed out: canvases, best fit, the resize
without distortion, tiling, bfloat16 normalisation) run on pixels resized by vlmkit's default
resize (torch's antialiased uint8 kernel, the one torchvision's resize calls) and padded as it pads.
`Llama4Processor` itself needs no torchvision: its own `_prompt_split_image` writes the text."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.processing.images import Resizer
from vlmkit.tokenizer import byte_level_tokenizer

# Llama 4's header-style chat template (restated, not copied): an image part renders as
# "<|image|>" directly before the text.
LLAMA4_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}{{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|eot|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\n\n' -}}{%- endif -%}"
)
IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
SETTINGS = {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor", "size": {"height": 32, "width": 32},
            "max_patches": 4, "resize_to_max_canvas": False, "resample": 2, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.3, 0.35],
            "do_convert_rgb": True}


def llama4_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>",
                            "additional_special_tokens": IMAGE_TOKENS + ["<|header_start|>", "<|header_end|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = LLAMA4_TEMPLATE
    return tok


def save_llama4(folder: Path, *, seed: int = 0) -> Path:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    tok = llama4_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 64, "intermediate_size_mlp": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2, "attention_chunk_size": 16, "max_position_embeddings": 4096,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192, "image_size": 32,
              "patch_size": 4, "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64,
              "pixel_shuffle_ratio": 0.5}
    config = Llama4Config(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<|patch|>"))
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("language_model" in name or "multi_modal_projector" in name):
                p.normal_(0, 0.1)  # at 0.02 every greedy token is the same whatever the image
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(LLAMA4_TEMPLATE)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(SETTINGS, indent=2))
    (Path(folder) / "processor_config.json").write_text(json.dumps({"processor_class": "Llama4Processor", "patch_size": 4,
                                                                   "pixel_shuffle_ratio": 0.5}))
    return Path(folder)


def transformers_image_processor_module():
    """transformers' image_processing_llama4, imported with torchvision stubbed (its module names
    torchvision at the top, for the resize, the pad and type hints only)."""
    name = "transformers.models.llama4.image_processing_llama4"
    if name in sys.modules:
        return sys.modules[name]
    stubs = {m: types.ModuleType(m) for m in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                                               "torchvision.transforms.v2.functional")}
    saved = {m: sys.modules.get(m) for m in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(name)
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old


def llama4_reference(folder, image, settings: dict | None = None):
    """transformers' Llama4ImageProcessor rule on one image: ((rows, cols), the views (tiles, then
    the global tile when there are several) as (views, 3, S, S) float32 of its bfloat16 values).
    Its own canvases, best fit, size without distortion and bfloat16 normalisation; the resize is
    vlmkit's default one and the pad its `pad_to_best_fit` (zeros at the bottom and right)."""
    from transformers.image_transforms import split_to_tiles
    from transformers.image_utils import SizeDict

    module = transformers_image_processor_module()
    s = settings or json.loads((Path(folder) / "preprocessor_config.json").read_text())
    tile = s["size"]["height"]
    size = SizeDict(height=tile, width=tile)
    module.find_supported_resolutions.cache_clear()
    canvases = torch.tensor(module.find_supported_resolutions(max_num_chunks=s["max_patches"], patch_size=size))
    width, height = image.size
    target = [int(x) for x in module.get_best_fit((height, width), canvases)]
    limit = (min(max(height, tile), target[0]), min(max(width, tile), target[1]))
    h, w = module.get_max_res_without_distortion((height, width), limit)
    h, w = max(h, 1), max(w, 1)
    resizer = Resizer(image, "bilinear", "torch")
    canvas = torch.zeros(1, 3, *target, dtype=torch.uint8)
    canvas[0, :, :h, :w] = resizer.resize(h, w)
    proc = object.__new__(module.Llama4ImageProcessor)
    proc.normalize = lambda x, mean, std, **_: (x - torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)) / torch.tensor(
        std, dtype=x.dtype).view(-1, 1, 1)  # tvF.normalize's sub_ / div_ in the tensor's dtype
    norm = lambda u8: proc.rescale_and_normalize(u8, True, s["rescale_factor"], True, s["image_mean"], s["image_std"])
    rows, cols = target[0] // tile, target[1] // tile
    views = split_to_tiles(norm(canvas), rows, cols)[0]
    if rows * cols > 1:
        views = torch.cat([views, norm(resizer.resize(tile, tile)[None])])
    return (rows, cols), views.float()


def llama4_reference_ids(folder, image, text, settings: dict | None = None):
    """transformers' Llama4Processor text for one image before the question: its chat template over
    the content list, `<|image|>` expanded by its own `_prompt_split_image`."""
    from transformers import AutoTokenizer, Llama4Processor

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    (rows, cols), _ = llama4_reference(folder, image, settings)
    p = json.loads((Path(folder) / "processor_config.json").read_text())
    s = settings or json.loads((Path(folder) / "preprocessor_config.json").read_text())
    tile = s["size"]["height"]
    per_tile = (tile // p["patch_size"]) ** 2 // round(1.0 / p["pixel_shuffle_ratio"] ** 2)
    expansion = Llama4Processor._prompt_split_image(None, (rows, cols), per_tile)
    content = [{"type": "image"}, {"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert rendered.count("<|image|>") == 1
    return tok(rendered.replace("<|image|>", expansion), add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _parity_reference(folder, image, question, prompt, model):
    ref_ids = llama4_reference_ids(folder, image, question)
    _, views = llama4_reference(folder, image)
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    ours = prompt.images[0].pixel_values
    assert ours.shape == views.shape
    torch.testing.assert_close(ours, views, atol=0, rtol=0)  # the same bfloat16 values
    return ref_ids, {"pixel_values": ours}


# Sizes: one tile (upscaled), wide and tall canvases (tiles + global), an odd one, a 2x2 canvas.
PARITY = ParityCase("llama4", save_llama4, "Llama4ForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (90, 30), (30, 80), (71, 45), (64, 60)), image_text="<image>")
