"""Llama 4 folders (`llama4`, `Llama4ForConditionalGeneration`) <-> vlmkit checkpoints.

* `vision_model` (its ViT and vision adapter) as the family's `llama4-vit` tower;
* `multi_modal_projector.linear_1` as the bias-free `linear` connector;
* the text model (`Llama4ForCausalLM`: mixture-of-experts layers every `interleave_moe_layer_step`,
  a shared expert, chunked attention on the RoPE layers, no-RoPE layers with attention temperature
  tuning) as the `hf` LLM;
* `Llama4ImageProcessor`'s settings (tile size, max_patches, mean / std) and `Llama4Processor`'s
  patch size and pixel-shuffle ratio as the `llama4` processor; `<|patch|>` is the slot token, the
  template's `<|image|>` the placeholder.

transformers' image processor needs torchvision, so export writes its preprocessor_config.json
as that processor saves it, without building it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.llama4.model import LLM, TOWER, Llama4Tower
from vlmkit.families.llama4.processor import IMAGE
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_from_state,
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
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import chat_template, plain_template, template_source, usable_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.mlp import LinearConnector

PATCH_TOKEN = "<|patch|>"
RESAMPLE_IDS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _processor_config(folder: Path, cfg) -> dict:
    s = image_processor_settings(folder)
    p = read_json(folder / "processor_config.json")
    size = s.get("size") or {"height": 336, "width": 336}
    vision = cfg.vision_config
    if size.get("height") != size.get("width") or size["height"] != vision.image_size:
        raise ExportError(f"{folder}: the image processor's tile {size} differs from the tower's square image_size {vision.image_size}")
    if int(p.get("patch_size", vision.patch_size)) != vision.patch_size:
        raise ExportError(f"{folder}: processor_config.json's patch_size {p.get('patch_size')} differs from the tower's "
                          f"{vision.patch_size}")
    if s.get("resize_to_max_canvas"):
        raise ExportError(f"{folder}: resize_to_max_canvas is not supported (vlmkit follows the default, smallest upscale)")
    return {"name": "llama4", "image_size": vision.image_size, "mean": list(s.get("image_mean", (0.5,) * 3)),
            "std": list(s.get("image_std", (0.5,) * 3)), "resample": resample_name({"resample": s.get("resample", 2)}),
            "options": {"patch_size": vision.patch_size, "pixel_shuffle_ratio": float(p.get("pixel_shuffle_ratio", vision.pixel_shuffle_ratio)),
                        "max_patches": int(s.get("max_patches", 16)), "sentinels": "never"}}


def _import_llama4(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    text_cfg = cfg.text_config
    parts = split_state(read_weights(folder), {"vision_model.": "vision", "model.vision_model.": "vision",
                                               "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
                                               "language_model.model.": "llm", "model.language_model.": "llm",
                                               "language_model.lm_head.": "head", "lm_head.": "head"})
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    tokenizer = load_tokenizer(folder)
    for token in (PATCH_TOKEN, IMAGE):
        check_in_vocab(tokenizer, token, str(folder / "tokenizer.json"))
    template = chat_template(folder, tokenizer)
    if not template:
        raise ExportError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
    tokenizer.chat_template = usable_template(template, tokenizer, IMAGE, template_source(folder))
    processor = _processor_config(folder, cfg)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)  # saved as Llama4ForCausalLM
        config = load_config({"model": {
            "vision": {"name": TOWER, "config": hf_config_dict(cfg.vision_config)},
            "connector": {"name": "linear", "options": {"bias": False}},
            "llm": {"name": LLM, "path": str(staged_llm)},
            "processor": processor,
            "image_token": PATCH_TOKEN,
        }})
        model = build_imported(config, PATCH_TOKEN, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision model", "vision_model.")
        load_part(model.connector, {"proj.weight": parts["projector"]["linear_1.weight"]}, "projector", "multi_modal_projector.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 8192, cap=32768))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owns(model) -> bool:
    return (model.config.processor.name == "llama4" and model.config.fusion == "prefix" and isinstance(model.vision, Llama4Tower)
            and isinstance(model.connector, LinearConnector) and model.connector.proj.bias is None)


@torch.no_grad()
def _reference_model(model):
    """transformers' Llama4ForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    if not _owns(model):
        raise ExportError("Llama 4 needs the llama4 processor, prefix fusion, the llama4-vit tower and a bias-free linear connector")
    llm_cfg = model.llm.config
    config = Llama4Config(vision_config=hf_config_dict(model.vision.model.config),
                          text_config=hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type},
                          image_token_index=model.image_token_id,
                          tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)))
    ref = Llama4ForConditionalGeneration(config).eval()
    prefix = "model." if any(k.startswith("model.") for k in ref.state_dict()) else ""
    state = {f"{prefix}vision_model.{k}": v for k, v in model.vision.model.state_dict().items()}
    state[f"{prefix}multi_modal_projector.linear_1.weight"] = model.connector.proj.weight
    lm = "language_model.model." if not prefix else "model.language_model."
    state |= {f"{lm}{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["language_model.lm_head.weight" if not prefix else "lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "Llama 4")
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


def _export_llama4(model, out: Path) -> Path:
    ref = _reference_model(model)
    tok, p, proc = model.tokenizer, model.config.processor, model.image_processor
    settings = {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
                "size": {"height": proc.tile, "width": proc.tile}, "max_patches": proc.max_patches, "resize_to_max_canvas": False,
                "resample": RESAMPLE_IDS[p.resample], "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std), "do_convert_rgb": True}
    processor = {"processor_class": "Llama4Processor", "patch_size": proc.patch_size,
                 "pixel_shuffle_ratio": float(p.options.get("pixel_shuffle_ratio", 0.5))}

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2))

    return atomic_folder(Path(out), write)


def _reference(model, prompt, ids):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])}


LLAMA4 = HFFamily(("llama4",), "Llama 4 (Llama4ForConditionalGeneration)", _import_llama4, _export_llama4, processor_is("llama4"),
                  _reference, specificity=5)
