"""Aya Vision folders (`aya_vision`, `AyaVisionForConditionalGeneration`) <-> vlmkit checkpoints.

* the SigLIP tower (`hf-random` + weights) read at `vision_feature_layer`: transformers takes
  `hidden_states[-1]`, the last layer *before* SigLIP's post-layernorm, so the layer is stored as
  the same index counted from the front (`layers + 1 + index`), which vlmkit's tower reads from
  `hidden_states` too (its -1 means the post-normed output);
* `multi_modal_projector` as the family's `pixel-shuffle-swiglu` connector (same tensor names);
* the Cohere / Cohere2 decoder as the `hf` LLM (its logit scale applied after the head, as for any
  LLM whose config declares one: `vlmkit.model.vlm.lm_head`);
* GotOcr2's image processor settings (tile size, min / max patches, crop_to_patches, mean / std,
  resample) and `AyaVisionProcessor`'s tags and `img_patch_token` (the image token) as the
  `aya_vision` processor.

The folder's chat template renders an image part as `<image>` directly before the text, so a
turn that opens with an image has no newline after it; vlmkit's chat and eval write `<image>`
then a newline, which the imported template drops after the leading image block
(`LEADING_IMAGE_PREAMBLE`), as it does for Fuyu.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.aya_vision.model import SwiGLUShuffleConnector
from vlmkit.families.aya_vision.processor import END, START, TILE, TILE_GLOBAL
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_from_state,
    causal_lm_state,
    check_in_vocab,
    hf_config_dict,
    image_processor_settings,
    load_part,
    load_tokenizer,
    max_positions,
    read_json,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.reference import llava_layout_state
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import STRING_TO_PARTS_PREAMBLE, chat_template, template_source, usable_template
from vlmkit.hf.writing import (
    build_imported,
    hf_generation_config,
    load_reference,
    save_with_processor,
    stage_llm,
    write_checkpoint,
)
from vlmkit.model.vision import HFVisionTower

IMAGE_TOKEN = "<|IMG_PATCH|>"
# Tensor names by part: transformers 5 names them model.*; folders saved by it keep the released names.
LAYOUT = {"model.vision_tower.": "vision", "vision_tower.": "vision", "model.multi_modal_projector.": "projector",
          "multi_modal_projector.": "projector", "model.language_model.": "llm", "language_model.model.": "llm",
          "language_model.lm_head.": "head", "lm_head.": "head"}
TOWERS = ("siglip_vision_model",)
# String turns that open with an image block: the newline after it is no part of the prompt.
LEADING_IMAGE_PREAMBLE = (
    "{%- set _aya = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string and m['content'].startswith(" + repr(START) + ") -%}"
    "{%- set _aya.msgs = _aya.msgs + [{'role': m['role'], 'content': m['content'].replace("
    + repr(END + "\n") + ", " + repr(END) + ", 1)}] -%}"
    "{%- else -%}{%- set _aya.msgs = _aya.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _aya.msgs -%}"
)


def _check_config(folder: Path, cfg) -> None:
    if cfg.vision_feature_select_strategy != "full":
        raise ExportError(f"{folder}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; SigLIP has no "
                          "CLS token and vlmkit reads every patch ('full')")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"{folder}: vision_feature_layer={cfg.vision_feature_layer}: concatenating layers has no vlmkit equivalent")
    if cfg.vision_config.model_type not in TOWERS:
        raise ExportError(f"{folder}: vision tower {cfg.vision_config.model_type!r}; vlmkit imports Aya Vision with {TOWERS}")


def _tags(folder: Path, tokenizer) -> dict:
    """AyaVisionProcessor's image tags (processor_config.json, else its defaults), checked in the vocabulary."""
    p = read_json(folder / "processor_config.json")
    tags = {"start": p.get("start_of_img_token", START), "end": p.get("end_of_img_token", END),
            "tile": p.get("tile_token", TILE), "tile_global": p.get("tile_global_token", TILE_GLOBAL)}
    for token in (tags["start"], tags["end"], p.get("img_patch_token", IMAGE_TOKEN)):
        check_in_vocab(tokenizer, token, f"{folder / 'processor_config.json'}")
    return tags


def _tokens_per_tile(folder: Path, tile: int, patch: int, factor: int) -> None:
    """AyaVisionProcessor writes (img_size // patch_size)^2 tokens per tile (its patch_size already
    times the downsample factor); the model makes (tile / patch / factor)^2: they must agree."""
    p = read_json(folder / "processor_config.json")
    img_size = p.get("img_size", tile)
    step = p.get("patch_size", patch * factor) * p.get("downsample_factor", 1)
    if (img_size // step) ** 2 != (tile // (patch * factor)) ** 2:
        raise ExportError(f"{folder}: AyaVisionProcessor writes ({img_size} // {step})^2 tokens per tile, the model makes "
                          f"({tile} // {patch} // {factor})^2")


def _template(folder: Path, tokenizer) -> str:
    template = chat_template(folder, tokenizer)
    if not template:
        raise ExportError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
    return LEADING_IMAGE_PREAMBLE + usable_template(template, tokenizer, IMAGE_TOKEN, template_source(folder))


def source_template(tokenizer) -> str | None:
    """The chat template as the folder had it (import prefixed it)."""
    template = tokenizer.chat_template
    for preamble in (LEADING_IMAGE_PREAMBLE, STRING_TO_PARTS_PREAMBLE):
        if isinstance(template, str) and template.startswith(preamble):
            template = template[len(preamble):]
    return template


def _processor_config(folder: Path, cfg, tags: dict) -> dict:
    settings = image_processor_settings(folder)
    vision = cfg.vision_config
    size = settings.get("size") or {"height": vision.image_size, "width": vision.image_size}
    if size.get("height") != size.get("width") or size["height"] != vision.image_size:
        raise ExportError(f"{folder}: the image processor's tile size {size} differs from the tower's square image_size "
                          f"{vision.image_size}")
    _tokens_per_tile(folder, vision.image_size, vision.patch_size, cfg.downsample_factor)
    crop = bool(settings.get("crop_to_patches", True))
    return {"name": "aya_vision", "image_size": vision.image_size, "mean": list(settings.get("image_mean", (0.5,) * 3)),
            "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings),
            "options": {"patch_size": vision.patch_size, "downsample_ratio": 1 / cfg.downsample_factor,
                        "min_num": int(settings.get("min_patches", 1)), "max_num": int(settings.get("max_patches", 12)) if crop else 1,
                        "sentinels": "never", **tags}}


def _import_aya_vision(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    _check_config(folder, cfg)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    parts = split_state(read_weights(folder), LAYOUT)
    llm_state = causal_lm_state(parts)
    tokenizer = load_tokenizer(folder)
    tags = _tags(folder, tokenizer)
    tokenizer.chat_template = _template(folder, tokenizer)
    processor = _processor_config(folder, cfg, tags)
    layer = cfg.vision_feature_layer % (vision_cfg.num_hidden_layers + 1)  # hidden_states[-1] is the last layer, pre-norm

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": hf_config_dict(vision_cfg),
                       "feature_layer": layer},
            "connector": {"name": "pixel-shuffle-swiglu", "options": {
                "ratio": 1 / cfg.downsample_factor, "norm_eps": cfg.adapter_layer_norm_eps,
                "hidden_size": getattr(cfg, "alignment_intermediate_size", text_cfg.hidden_size)}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": processor,
            "image_token": IMAGE_TOKEN,
        }})
        model = build_imported(config, IMAGE_TOKEN, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_tower.")
        load_part(model.connector, parts["projector"], "projector", "model.multi_modal_projector.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _reference_model(model):
    """transformers' AyaVisionForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    conn, tower, llm_cfg = model.connector, model.vision, model.llm.config
    if (not isinstance(conn, SwiGLUShuffleConnector) or not isinstance(tower, HFVisionTower)
            or tower.model.config.model_type not in TOWERS or tower.feature_layer < 0):
        raise ExportError("Aya Vision needs a SigLIP tower read from hidden_states (feature_layer >= 0) and the "
                          "pixel-shuffle-swiglu connector")
    vision = hf_config_dict(tower.model.config) | {"model_type": tower.model.config.model_type}
    tied = bool(getattr(llm_cfg, "tie_word_embeddings", False))
    config = AyaVisionConfig(vision_config=vision, text_config=hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type},
                             downsample_factor=conn.factor, adapter_layer_norm_eps=conn.options.norm_eps,
                             alignment_intermediate_size=conn.hidden, image_token_index=model.image_token_id,
                             vision_feature_layer=tower.feature_layer - (tower.model.config.num_hidden_layers + 1),
                             vision_feature_select_strategy="full", tie_word_embeddings=tied)
    ref = AyaVisionForConditionalGeneration(config).eval()
    state = llava_layout_state(model, conn.state_dict())
    load_reference(ref, state, "Aya Vision")
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


def _export_aya_vision(model, out: Path) -> Path:
    from transformers import AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ref = _reference_model(model)
    p, proc = model.config.processor, model.image_processor
    image_processor = GotOcr2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, crop_to_patches=proc.max_num > 1,
                                               min_patches=proc.min_num, max_patches=proc.max_num, image_mean=list(p.mean),
                                               image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    # The processor gets a copy holding the folder's own template, never the model's tokenizer.
    tok = copy.deepcopy(model.tokenizer)
    tok.chat_template = source_template(model.tokenizer)
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=proc.patch_size,
                                   img_size=p.image_size, downsample_factor=model.connector.factor, image_token="<image>",
                                   start_of_img_token=proc.start, end_of_img_token=proc.end, img_patch_token=model.config.image_token,
                                   tile_token=proc.tile, tile_global_token=proc.tile_global, chat_template=tok.chat_template)
    return save_with_processor(ref, processor, out)


def _reference(model, prompt, ids):
    from transformers import AyaVisionForConditionalGeneration

    return AyaVisionForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])}


AYA_VISION = HFFamily(("aya_vision",), "Aya Vision (AyaVisionForConditionalGeneration)", _import_aya_vision, _export_aya_vision,
                      processor_is("aya_vision"), _reference, specificity=5)
