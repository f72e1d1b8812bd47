"""A tiny random Cohere2-Vision folder, saved with `save_pretrained` (model, tokenizer with its
image tokens, chat template, the image processor's settings), and its parity case: the same input
ids as `Cohere2VisionProcessor.replace_image_token`, the tile grid of transformers' own
`get_optimal_tiled_canvas` (its source run here: the module imports torchvision), pixels within
docs/preprocessing.md's 3/255 of the documented rule (the image squashed onto the canvas with PIL
bicubic, cut into tiles, plus a thumbnail), logits and greedy tokens, on sizes that pick 1, 2, 3
and 4 tiles."""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import numpy as np
import torch
from _hf_folders import _sharpen
from _parity import ParityCase
from PIL import Image

from vlmkit.tokenizer import byte_level_tokenizer

PIXEL_TOLERANCE = 3 / 255
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.3, 0.35]
TOKENS = {"image_token": "<|IMG_PATCH|>", "boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>",
          "img_line_break_token": "<|IMG_LINE_BREAK|>"}
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|IMG_PATCH|>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_cohere2_vision(folder: Path, *, seed: int = 0, tile: int = 32, patch: int = 4, max_patches: int = 4) -> Path:
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(TOKENS.values())}, replace_extra_special_tokens=False)
    text = {"model_type": "cohere2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "sliding_window": 16,
            "logit_scale": 0.5, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": tile, "patch_size": patch}
    config = Cohere2VisionConfig(vision_config=vision, text_config=text, downsample_factor=2, alignment_intermediate_size=96,
                                 image_token_id=tok.convert_tokens_to_ids(TOKENS["image_token"]))
    model = Cohere2VisionForConditionalGeneration(config).eval()
    _sharpen(model)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"extra_special_tokens": TOKENS}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Cohere2VisionImageProcessor", "size": {"height": tile, "width": tile}, "crop_to_patches": True,
        "min_patches": 1, "max_patches": max_patches, "patch_size": tile // patch // 2, "image_mean": MEAN, "image_std": STD,
        "resample": 3}))
    return folder


@functools.cache
def transformers_canvas():
    """transformers' `get_optimal_tiled_canvas`, from its source (importing the module needs torchvision)."""
    import transformers.models.cohere2_vision as pkg

    source = (Path(pkg.__file__).parent / "image_processing_cohere2_vision.py").read_text()
    wanted = {"get_all_supported_aspect_ratios", "get_optimal_tiled_canvas"}
    body = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    scope = {"np": np, "lru_cache": functools.lru_cache}
    exec(compile(ast.Module(body=body, type_ignores=[]), "cohere2_canvas", "exec"), scope)  # noqa: S102  (the installed transformers source: two pure functions)
    return scope["get_optimal_tiled_canvas"]


def reference_pixels(image: Image.Image, tile: int, max_patches: int) -> torch.Tensor:
    cols, rows = transformers_canvas()((image.height, image.width), (tile, tile), 1, max_patches)
    canvas = image.convert("RGB").resize((cols * tile, rows * tile), Image.BICUBIC)
    views = [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if len(views) > 1:
        views.append(image.convert("RGB").resize((tile, tile), Image.BICUBIC))
    arr = np.stack([np.asarray(v, dtype=np.float32) / 255 for v in views])
    return torch.from_numpy((arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)).permute(0, 3, 1, 2)


def reference_ids(folder: Path, content: list[dict], views: list[int]) -> torch.Tensor:
    from transformers import AutoTokenizer, Cohere2VisionProcessor

    settings = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    proc = object.__new__(Cohere2VisionProcessor)
    proc.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc.patch_size = settings["patch_size"]
    proc.boi_token, proc.eoi_token = proc.tokenizer.boi_token, proc.tokenizer.eoi_token
    proc.image_token, proc.img_line_break_token = proc.tokenizer.image_token, proc.tokenizer.img_line_break_token
    rendered = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split(proc.image_token)
    rendered = parts[0] + "".join(proc.replace_image_token({"num_patches": views}, i) + rest for i, rest in enumerate(parts[1:]))
    return proc.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _parity_reference(folder, image, question, prompt, model):
    ours = prompt.images[0].pixel_values
    theirs = reference_pixels(image, model.config.processor.image_size, model.image_processor.max_num)
    assert ours.shape == theirs.shape
    std = torch.tensor(STD)[:, None, None]
    assert ((ours - theirs).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    ids = reference_ids(folder, [{"type": "image"}, {"type": "text", "text": question}], [ours.shape[0]])
    assert model.count_image_tokens(prompt.images[0]) == int((ids == model.image_token_id).sum())
    return ids, {"pixel_values": ours}


# (30, 30): one tile; (72, 40): 2x1 + thumbnail; (24, 90): 1x3 + thumbnail; (100, 100): 2x2 + thumbnail (down-scaled).
PARITY = ParityCase("cohere2_vision", save_cohere2_vision, "Cohere2VisionForConditionalGeneration", _parity_reference,
                    sizes=((30, 30), (72, 40), (24, 90), (100, 100)))
