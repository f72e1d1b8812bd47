"""LLaVA-OneVision (`llava_onevision`, transformers' `LlavaOnevisionForConditionalGeneration`).

Its weights and layout are LLaVA-NeXT's (SigLIP tower, 2-layer GELU projector, `image_newline`,
any causal LM), so the import is LLaVA-NeXT's (`families/llava_next/hf.py`) with the `anyres-max` processor
(`families/llava_onevision/processor.py`): AnyRes whose feature map is capped at anyres_max_N tiles (the
model's assembler resizes it, as `pack_image_features` does), and, in a prompt with several
images, each image padded to a square and read at base resolution plus one newline.

Export writes `LlavaOnevisionForConditionalGeneration`'s config and weights, the PIL image
processor's settings, the tokenizer, the chat template and `processor_config.json` (the
processor class, `num_image_tokens`, `vision_aspect_ratio`, the image token).

Video: transformers' video processor needs torchvision; vlmkit does not import OneVision's video
layout (2x2-pooled frame features with one trailing newline), so imported models read images only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlmkit.families.llava_next.hf import import_llava_next
from vlmkit.hf.folder import ExportError, read_json
from vlmkit.hf.reference import finished_reference, language_model_state, projector_state, text_part, vision_feature_settings
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.writing import write_export
from vlmkit.model.connectors.mlp import MLPConnector
from vlmkit.model.vision import HFVisionTower


def _max_tiles(aspect: str | None, where: str) -> int:
    match = re.fullmatch(r"anyres_max_(\d+)", aspect or "anyres_max_9")
    if not match:
        raise ExportError(f"{where}: vision_aspect_ratio {aspect!r} is not anyres_max_N, the only form vlmkit reads")
    return int(match.group(1))


def import_llava_onevision(folder: Path, out: Path) -> Path:
    folder = Path(folder)
    cfg = read_hf_config(folder)
    max_tiles = _max_tiles(cfg.get("vision_aspect_ratio"), str(folder / "config.json"))
    processor_cfg = read_json(folder / "processor_config.json")
    if "vision_aspect_ratio" in processor_cfg and _max_tiles(processor_cfg["vision_aspect_ratio"], "") != max_tiles:
        raise ExportError(f"{folder}: processor_config.json's vision_aspect_ratio {processor_cfg['vision_aspect_ratio']!r} "
                          f"differs from config.json's {cfg.get('vision_aspect_ratio')!r}")
    return import_llava_next(folder, out, processor="anyres-max", processor_options={"max_tiles": max_tiles})


@torch.no_grad()
def onevision_reference(model):
    """transformers' LlavaOnevisionForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    conn, tower, proc = model.connector, model.vision, model.image_processor
    if (model.config.processor.name != "anyres-max" or not isinstance(conn, MLPConnector) or not isinstance(tower, HFVisionTower)
            or not proc.learned_newline):
        raise ExportError("LLaVA-OneVision needs a SigLIP / CLIP tower, the mlp connector and the anyres-max processor")
    layer, strategy, tie_last = vision_feature_settings(model)
    text, text_state = text_part(model)
    vocab = model.tokenizer.get_vocab()
    config = LlavaOnevisionConfig(
        vision_config={**tower.model.config.to_dict(), "tie_last_hidden_states": tie_last}, text_config=text,
        image_token_index=model.image_token_id, video_token_index=vocab.get("<video>", model.image_token_id + 1),
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints], vision_aspect_ratio=f"anyres_max_{proc.max_tiles}",
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = LlavaOnevisionForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    state |= projector_state(conn) | {"model.image_newline": conn.image_newline}
    state |= language_model_state(text_state)
    return finished_reference(ref, state, model)


@torch.no_grad()
def export_llava_onevision(model, out: str | Path) -> Path:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    ref = onevision_reference(model)
    tok = model.tokenizer
    p, proc = model.config.processor, model.image_processor
    s = p.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=[list(x) for x in proc.grid_pinpoints], image_mean=list(p.mean),
        image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    grid = s // proc.patch_size

    return write_export(out, ref, tok, {
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": grid * grid,
        "vision_feature_select_strategy": ref.config.vision_feature_select_strategy,
        "vision_aspect_ratio": f"anyres_max_{proc.max_tiles}", "image_token": model.config.image_token,
        "video_token": "<video>"}, image_processor)


def _reference(model, prompt, ids):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration, onevision_inputs(prompt)


def onevision_inputs(prompt) -> dict:
    """`pixel_values` (images, max views, 3, S, S), `image_sizes` and `batch_num_images` for one
    vlmkit-encoded prompt."""
    images = prompt.images
    views = max(im.pixel_values.shape[0] for im in images)
    first = images[0].pixel_values
    pixels = first.new_zeros((len(images), views, *first.shape[1:]))
    for i, im in enumerate(images):
        pixels[i, : im.pixel_values.shape[0]] = im.pixel_values
    return {"pixel_values": pixels, "image_sizes": torch.tensor([list(im.image_size) for im in images]),
            "batch_num_images": torch.tensor([len(images)])}


LLAVA_ONEVISION = HFFamily(("llava_onevision",), "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)", import_llava_onevision,
                           export_llava_onevision, processor_is("anyres-max"), _reference, specificity=10)
