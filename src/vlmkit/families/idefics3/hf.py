"""Idefics3 and SmolVLM v1 (`idefics3`): import and export.

Its vision transformer as a SigLIP tower (`hf-random` + weights), pixel shuffle + one bias-free
linear (`pixel-shuffle`, `norm: none`), any causal LM, and the `idefics3` processor (crop size,
longest edge, splitting, mean/std). SmolVLM2 (`smolvlm`) builds on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_from_state,
    causal_lm_state,
    hf_config_dict,
    image_processor_settings,
    load_part,
    max_positions,
    read_weights,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import (
    build_imported,
    hf_generation_config,
    load_reference,
    save_with_processor,
    stage_llm,
    write_checkpoint,
)
from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector
from vlmkit.model.vision import HFVisionTower


def import_idefics3(folder: Path, out: Path, tower: str = "siglip_vision_model", processor: str = "idefics3",
                    processor_options: dict | None = None) -> Path:
    """Idefics3 / SmolVLM: its vision transformer is SigLIP's (same weights and, for the
    full-size crops its processor makes, the same position ids), its connector a pixel shuffle
    plus one bias-free linear layer, its LLM a Llama. `tower`: the transformers vision model the
    weights load into (SmolVLM2 keeps its own, `smolvlm_vision`); `processor` and
    `processor_options`: SmolVLM2's processor family (video) and its settings."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_model.": "vision", "vision_model.": "vision",
                                "model.connector.": "connector", "connector.": "connector",
                                "model.text_model.": "llm", "text_model.": "llm", "lm_head.": "head"})
    proj = parts["connector"].get("modality_projection.proj.weight")
    if proj is None:
        raise ExportError(f"{folder}: connector.modality_projection.proj.weight is missing")
    llm_state = causal_lm_state(parts)
    settings = image_processor_settings(folder)
    crop = (settings.get("max_image_size") or {}).get("longest_edge") or vision_cfg.image_size
    if crop != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's crop size {crop} differs from the vision tower's image_size {vision_cfg.image_size}")
    longest = (settings.get("size") or {}).get("longest_edge") or 4 * crop
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(settings.get("resample", 1), "lanczos")
    image_token = "<image>"
    tokenizer = folder_tokenizer(folder, image_token)
    siglip = hf_config_dict(vision_cfg) | ({"vision_use_head": False} if tower == "siglip_vision_model" else {})

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": tower, "config": siglip},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 1 / cfg.scale_factor, "norm": "none",
                                                               "projector": "linear", "bias": False}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": processor, "image_size": crop, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)),
                          "options": {"patch_size": vision_cfg.patch_size, "scale_factor": cfg.scale_factor, "longest_edge": longest,
                                      "do_image_splitting": bool(settings.get("do_image_splitting", True)), "resample": resample,
                                      "sentinels": "never", **(processor_options or {})}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_model.")
        load_part(model.connector, {"proj.weight": proj}, "connector", "model.connector.modality_projection(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def idefics3_reference(model, config_cls=None, model_cls=None, tower_type: str = "siglip_vision_model"):
    """transformers' Idefics3 (or, given SmolVLM's classes and tower, SmolVLM) holding the vlmkit
    model's weights, with its generation config."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config_cls, model_cls = config_cls or Idefics3Config, model_cls or Idefics3ForConditionalGeneration
    family = config_cls.__name__.removesuffix("Config")
    conn, tower = model.connector, model.vision
    if (not isinstance(conn, PixelShuffleConnector) or conn.options.norm != "none" or conn.options.projector != "linear"
            or conn.options.bias or not isinstance(tower, HFVisionTower) or tower.model.config.model_type != tower_type
            or tower.feature_layer != -1):
        raise ExportError(f"{family} needs a {tower_type} tower (last layer) and a pixel-shuffle connector with no norm and one "
                          "bias-free linear layer")
    vision = {k: v for k, v in hf_config_dict(tower.model.config).items() if k not in ("vision_use_head",)}
    text = hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    config = config_cls(vision_config=vision, text_config=text, image_token_id=model.image_token_id,
                        scale_factor=conn.factor, tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = model_cls(config).eval()
    state = {f"model.vision_model.{k}": v for k, v in tower.model.state_dict().items() if "position_ids" not in k}
    state["model.connector.modality_projection.proj.weight"] = conn.proj.weight
    state |= {f"model.text_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, family)
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


@torch.no_grad()
def export_idefics3(model, out: str | Path) -> Path:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ref = idefics3_reference(model)
    tok = model.tokenizer
    o = model.config.processor.options
    p = model.config.processor
    resample = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}[o.get("resample", "lanczos")]
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": o.get("longest_edge", 4 * p.image_size)},
                                                max_image_size={"longest_edge": p.image_size}, resample=resample,
                                                do_image_splitting=o.get("do_image_splitting", True),
                                                image_mean=list(p.mean), image_std=list(p.std))
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=model.image_processor.image_seq_len,
                                  chat_template=plain_template(tok))

    return save_with_processor(ref, processor, out)


def _idefics3_reference(model, prompt, ids):
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values[None]}


IDEFICS3 = HFFamily(("idefics3",), "Idefics3 / SmolVLM (Idefics3ForConditionalGeneration)", import_idefics3, export_idefics3,
                    processor_is("idefics3"), _idefics3_reference, specificity=3)
