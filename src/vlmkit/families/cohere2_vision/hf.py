"""Cohere2-Vision folders (`cohere2_vision`, `Cohere2VisionForConditionalGeneration`) <-> vlmkit
checkpoints.

* the SigLIP tower (`hf-random` + weights), read at its output (`last_hidden_state`, after the
  post-layernorm, as transformers reads it);
* `multi_modal_projector` as Aya Vision's `pixel-shuffle-swiglu` connector without its LayerNorm
  (`layernorm: false`; same tensor names);
* the Cohere2 decoder as the `hf` LLM, with no logit scale: transformers' class applies none after
  its head, whatever the text config says;
* the image processor's tile size, `max_patches`, mean / std and resample, and the tokenizer's
  `boi_token` / `eoi_token` / `img_line_break_token` / `image_token`, as the `cohere2_vision`
  processor.

Export writes the model, the tokenizer (with those tokens), the chat template and the image
processor's settings as JSON (`Cohere2VisionImageProcessor` needs torchvision).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.aya_vision.hf import LAYOUT
from vlmkit.families.aya_vision.model import SwiGLUShuffleConnector
from vlmkit.families.cohere2_vision.processor import END, LINE_BREAK, START
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_from_state,
    causal_lm_state,
    check_in_vocab,
    hf_config_dict,
    image_processor_settings,
    load_part,
    max_positions,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.reference import llava_layout_state
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.vision import HFVisionTower

IMAGE_TOKEN = "<|IMG_PATCH|>"
RESAMPLE_IDS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _tokens(folder: Path, tokenizer) -> dict:
    """The tokenizer's image tokens (its extra special tokens, else the released names), in its vocabulary."""
    tokens = {"image": getattr(tokenizer, "image_token", None) or IMAGE_TOKEN, "start": getattr(tokenizer, "boi_token", None) or START,
              "end": getattr(tokenizer, "eoi_token", None) or END,
              "line_break": getattr(tokenizer, "img_line_break_token", None) or LINE_BREAK}
    for token in tokens.values():
        check_in_vocab(tokenizer, token, f"{folder} (tokenizer)")
    return tokens


def _processor(folder: Path, cfg, tokens: dict) -> dict:
    settings = image_processor_settings(folder)
    vision = cfg.vision_config
    size = settings.get("size") or {"height": vision.image_size, "width": vision.image_size}
    if size.get("height") != size.get("width") or size["height"] != vision.image_size:
        raise ExportError(f"{folder}: the image processor's tile size {size} differs from the tower's square image_size {vision.image_size}")
    tokens_side = settings.get("patch_size", vision.image_size // vision.patch_size // cfg.downsample_factor)
    if tokens_side != vision.image_size // vision.patch_size // cfg.downsample_factor:
        raise ExportError(f"{folder}: Cohere2VisionProcessor writes {tokens_side}^2 tokens a tile (the image processor's patch_size), "
                          f"the model makes ({vision.image_size} // {vision.patch_size} // {cfg.downsample_factor})^2")
    crop = bool(settings.get("crop_to_patches", True))
    return {"name": "cohere2_vision", "image_size": vision.image_size, "mean": list(settings.get("image_mean", (0.5,) * 3)),
            "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings),
            "options": {"patch_size": vision.patch_size, "downsample_ratio": 1 / cfg.downsample_factor,
                        "max_num": int(settings.get("max_patches", 12)) if crop else 1, "sentinels": "never",
                        "start": tokens["start"], "end": tokens["end"], "line_break": tokens["line_break"]}}


def import_cohere2_vision(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, copy.deepcopy(cfg.text_config)
    # Cohere2VisionForConditionalGeneration applies no logit scale after its head (Cohere2's own
    # causal LM does): the imported LLM declares none, so vlmkit's head matches the class.
    text_cfg.logit_scale = 1.0
    if vision_cfg.model_type != "siglip_vision_model":
        raise ExportError(f"{folder}: vision tower {vision_cfg.model_type!r}; vlmkit imports Cohere2-Vision with a SigLIP tower")
    parts = split_state(read_weights(folder), LAYOUT)
    llm_state = causal_lm_state(parts)
    probe = folder_tokenizer(folder, IMAGE_TOKEN)
    tokens = _tokens(folder, probe)
    tokenizer = folder_tokenizer(folder, tokens["image"]) if tokens["image"] != IMAGE_TOKEN else probe

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "pixel-shuffle-swiglu", "options": {
                "ratio": 1 / cfg.downsample_factor, "layernorm": False, "hidden_size": cfg.alignment_intermediate_size}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": _processor(folder, cfg, tokens),
            "image_token": tokens["image"],
        }})
        model = build_imported(config, tokens["image"], cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_tower.")
        load_part(model.connector, parts["projector"], "projector", "model.multi_modal_projector.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def cohere2_vision_reference(model):
    """transformers' Cohere2VisionForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    conn, tower, llm_cfg = model.connector, model.vision, model.llm.config
    if (not isinstance(conn, SwiGLUShuffleConnector) or conn.options.layernorm or not isinstance(tower, HFVisionTower)
            or tower.feature_layer != -1):
        raise ExportError("Cohere2-Vision needs a SigLIP tower read at its output and pixel-shuffle-swiglu without its LayerNorm")
    vision = hf_config_dict(tower.model.config) | {"model_type": tower.model.config.model_type}
    config = Cohere2VisionConfig(vision_config=vision, text_config=hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type},
                                 downsample_factor=conn.factor, alignment_intermediate_size=conn.hidden,
                                 image_token_id=model.image_token_id, tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)))
    ref = Cohere2VisionForConditionalGeneration(config).eval()
    state = llava_layout_state(model, conn.state_dict())
    load_reference(ref, state, "Cohere2-Vision")
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


def export_cohere2_vision(model, out: str | Path) -> Path:
    ref = cohere2_vision_reference(model)
    p, proc, tok = model.config.processor, model.image_processor, model.tokenizer
    s = p.image_size
    settings = {"image_processor_type": "Cohere2VisionImageProcessor", "size": {"height": s, "width": s},
                "crop_to_patches": proc.max_num > 1, "min_patches": 1, "max_patches": proc.max_num,
                "patch_size": s // proc.patch_size // model.connector.factor, "image_mean": list(p.mean), "image_std": list(p.std),
                "resample": RESAMPLE_IDS[p.resample], "do_resize": True, "do_rescale": True, "do_normalize": True}
    extra = {"image_token": model.config.image_token, "boi_token": proc.start, "eoi_token": proc.end,
             "img_line_break_token": proc.line_break}

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg | {"extra_special_tokens": extra}, indent=2))
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps({"processor_class": "Cohere2VisionProcessor"}, indent=2))

    return atomic_folder(Path(out), write)


def _reference(model, prompt, ids):
    from transformers import Cohere2VisionForConditionalGeneration

    return Cohere2VisionForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])}


COHERE2_VISION = HFFamily(("cohere2_vision",), "Cohere2-Vision (Cohere2VisionForConditionalGeneration)", import_cohere2_vision,
                          export_cohere2_vision, processor_is("cohere2_vision"), _reference, specificity=5)
