"""InternVL, transformers' port (`internvl`): import and export.

Its ViT (`internvl_vision`, CLS dropped) as a Hugging Face tower, pixel shuffle with a post-norm
GELU MLP (`pixel-shuffle`, `norm: post`), any causal LM, and the `dynamic` processor (tile size,
min/max patches, thumbnail).
"""

from __future__ import annotations

import json
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
    read_json,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector
from vlmkit.model.vision import HFVisionTower


def import_internvl(folder: Path, out: Path) -> Path:
    """InternVL (transformers' port): its ViT (`hf-random`, internvl_vision, CLS dropped), pixel
    shuffle with a LayerNorm after the merge and a 2-layer GELU MLP (`pixel-shuffle`, `norm:
    post`), any causal LM, the `dynamic` tiling processor (min/max patches, thumbnail)."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if cfg.vision_feature_select_strategy != "default":
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: vlmkit drops InternVL's CLS token ('default')")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP projector uses exact GELU")
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_tower.": "vision", "vision_tower.": "vision",
                                "model.multi_modal_projector.": "projector", "multi_modal_projector.": "projector",
                                "model.language_model.": "llm", "language_model.model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    p = parts["projector"]
    names = {"norm.weight": "layer_norm.weight", "norm.bias": "layer_norm.bias", "proj.0.weight": "linear_1.weight",
             "proj.0.bias": "linear_1.bias", "proj.2.weight": "linear_2.weight", "proj.2.bias": "linear_2.bias"}
    absent = [v for v in names.values() if v not in p]
    if absent:
        raise ExportError(f"{folder}: multi_modal_projector tensors are missing: {absent}")
    connector_state = {ours: p[theirs] for ours, theirs in names.items()}
    llm_state = causal_lm_state(parts)
    settings = image_processor_settings(folder)
    size = (settings.get("size") or {}).get("height") or vision_cfg.image_size[0]
    patch = vision_cfg.patch_size[0] if isinstance(vision_cfg.patch_size, (list, tuple)) else vision_cfg.patch_size
    processor_cfg = read_json(folder / "processor_config.json")
    image_token = processor_cfg.get("image_token", "<IMG_CONTEXT>")
    tokenizer = folder_tokenizer(folder, image_token)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": "internvl_vision", "config": hf_config_dict(vision_cfg),
                       "feature_layer": cfg.vision_feature_layer},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": cfg.downsample_ratio, "norm": "post", "norm_eps": 1e-5,
                                                               "projector": "mlp", "hidden_size": text_cfg.hidden_size}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "dynamic", "image_size": size, "mean": list(settings.get("image_mean", (0.485, 0.456, 0.406))),
                          "std": list(settings.get("image_std", (0.229, 0.224, 0.225))), "resample": resample_name(settings),
                          "options": {"patch_size": patch, "downsample_ratio": cfg.downsample_ratio,
                                      "min_num": int(settings.get("min_patches", 1)),
                                      "max_num": int(settings.get("max_patches", 12)) if settings.get("crop_to_patches", True) else 1,
                                      "use_thumbnail": bool(settings.get("use_thumbnail", True)), "sentinels": "never"}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_tower.")
        load_part(model.connector, connector_state, "projector", "model.multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def export_internvl(model, out: str | Path) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    conn, tower = model.connector, model.vision
    if (not isinstance(conn, PixelShuffleConnector) or conn.options.norm != "post" or conn.options.projector != "mlp"
            or conn.options.norm_kind != "layernorm" or not isinstance(tower, HFVisionTower)
            or tower.model.config.model_type != "internvl_vision"):
        raise ExportError("InternVL needs its own ViT (internvl_vision) and a pixel-shuffle connector with a LayerNorm after the "
                          "merge and the 2-layer GELU MLP")
    tok = model.tokenizer
    text = hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    config = InternVLConfig(vision_config=hf_config_dict(tower.model.config), text_config=text, image_token_id=model.image_token_id,
                            downsample_ratio=conn.options.ratio, vision_feature_layer=tower.feature_layer,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu",
                            tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = InternVLForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    names = {"norm.weight": "layer_norm.weight", "norm.bias": "layer_norm.bias", "proj.0.weight": "linear_1.weight",
             "proj.0.bias": "linear_1.bias", "proj.2.weight": "linear_2.weight", "proj.2.bias": "linear_2.bias"}
    cstate = conn.state_dict()
    state |= {f"model.multi_modal_projector.{theirs}": cstate[ours] for ours, theirs in names.items()}
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "InternVL")
    ref.generation_config = hf_generation_config(tok)
    p, proc = model.config.processor, model.image_processor
    image_processor = GotOcr2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, crop_to_patches=proc.max_num > 1,
                                               min_patches=proc.min_num, max_patches=proc.max_num, use_thumbnail=proc.use_thumbnail,
                                               image_mean=list(p.mean), image_std=list(p.std),
                                               resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    tokens_per_tile = conn.num_tokens(tower.grid(p.image_size))

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps({
            "processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile, "image_token": model.config.image_token}, indent=2))

    return atomic_folder(Path(out), write)


def _internvl_reference(model, prompt, ids):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values}


INTERNVL = HFFamily(("internvl",), "InternVL (transformers' InternVLForConditionalGeneration)", import_internvl,
                    export_internvl, processor_is("dynamic"), _internvl_reference, specificity=4)
