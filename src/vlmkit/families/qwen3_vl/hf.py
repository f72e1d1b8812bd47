"""Qwen3-VL (`qwen3_vl`): import and export.

The `qwen3-vit` tower, its PatchMerger and DeepStack mergers as the `qwen3-vl-merger` connector
(whose extra levels prefix fusion adds after the first decoder layers), the interleaved-M-RoPE
decoder (`qwen3-vl-text`), and the `qwen3vl` processor (Qwen2-VL's smart_resize with the
folder's pixel bounds, 16 px patches; videos with a timestamp per temporal patch). Imported
models never write vlmkit's `<image_k>` sentinels: the released checkpoints were not trained
with them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlmkit.families.qwen2_vl.hf import (
    MROPE_LAYOUT,
    _qwen2_vl_video,
    folder_image_token,
    mrope_image_processor,
    mrope_reference_inputs,
    patch_and_merge,
    set_vision_token_ids,
    write_mrope_import,
)
from vlmkit.families.qwen3_vl.model import Qwen3ViTTower, Qwen3VLCausalLM
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_state,
    hf_config_dict,
    image_processor_settings,
    read_json,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.reference import language_model_state, load_strict, text_part
from vlmkit.hf.registry import HFFamily
from vlmkit.hf.writing import hf_generation_config, write_export

# transformers' merger names -> the connector's pixel-shuffle parts.
_MERGER = {"norm.weight": "norm.weight", "norm.bias": "norm.bias", "linear_fc1.weight": "proj.0.weight",
           "linear_fc1.bias": "proj.0.bias", "linear_fc2.weight": "proj.2.weight", "linear_fc2.bias": "proj.2.bias"}


def _connector_state(vision: dict[str, torch.Tensor], levels: int, folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for ours, theirs in (("main.", "merger."), *((f"levels.{k}.", f"deepstack_merger_list.{k}.") for k in range(levels))):
        for src, dst in _MERGER.items():
            if theirs + src not in vision:
                raise ExportError(f"{folder}: the vision merger weight visual.{theirs}{src} is missing")
            state[ours + dst] = vision[theirs + src]
    return state


def _processor_options(folder: Path, vision_cfg) -> tuple[dict, dict]:
    settings = image_processor_settings(folder)
    patch, merge = patch_and_merge(folder, settings, vision_cfg)
    size = settings.get("size") or {}
    options = {"patch_size": patch, "merge_size": merge,
               "temporal_patch_size": settings.get("temporal_patch_size", vision_cfg.temporal_patch_size),
               "min_pixels": int(settings.get("min_pixels") or size.get("shortest_edge") or 65536),
               "max_pixels": int(settings.get("max_pixels") or size.get("longest_edge") or 16777216), "sentinels": "never"}
    return settings, options


def _qwen3_vl_video(folder: Path, cfg, tokenizer, processor_cfg: dict) -> tuple[str | None, dict]:
    """Qwen2-VL's video settings, with Qwen3VLVideoProcessor's defaults where the folder is silent:
    a whole clip within 128 .. 768 merge windows of 32 px, frames sampled at 2 per second."""
    token, options = _qwen2_vl_video(folder, cfg, tokenizer, processor_cfg)
    if token is None:
        return token, options
    settings = read_json(folder / "video_preprocessor_config.json") or processor_cfg.get("video_processor") or {}
    options.setdefault("video_min_pixels", 128 * 32 * 32)
    options.setdefault("video_max_pixels", 768 * 32 * 32)
    if "do_sample_frames" not in settings:
        options["video"] |= {"sampling": "fps", "fps": float(settings.get("fps") or 2.0),
                             "min_frames": int(settings.get("min_frames") or 4), "max_frames": int(settings.get("max_frames") or 768)}
    return token, options


def import_qwen3_vl(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    cfg = auto_config(folder)
    parts = split_state(read_weights(folder), MROPE_LAYOUT)
    vision_cfg = cfg.vision_config
    levels = len(vision_cfg.deepstack_visual_indexes)
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith(("merger.", "deepstack_merger_list."))}
    connector_state = _connector_state(parts["vision"], levels, folder)
    llm_state = causal_lm_state(parts)
    settings, options = _processor_options(folder, vision_cfg)
    processor_cfg, probe, image_token, tokenizer = folder_image_token(folder, cfg)
    video_token, video_options = _qwen3_vl_video(folder, cfg, probe, processor_cfg)
    width = vision_cfg.hidden_size * vision_cfg.spatial_merge_size**2

    def recipe(staged_llm: Path) -> dict:
        return {
            "vision": {"name": "qwen3-vit", "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "qwen3-vl-merger", "options": {"ratio": 1 / vision_cfg.spatial_merge_size, "levels": levels,
                                                                 "hidden_size": width, "norm_eps": 1e-6}},
            "llm": {"name": "qwen3-vl-text", "path": str(staged_llm)},
            "processor": {"name": "qwen3vl", "image_size": options["patch_size"] * options["merge_size"] * 8,
                          "mean": list(settings.get("image_mean", (0.5, 0.5, 0.5))),
                          "std": list(settings.get("image_std", (0.5, 0.5, 0.5))),
                          "resample": resample_name(settings), "options": options | video_options},
            "image_token": image_token,
            "video_token": video_token,
        }

    return write_mrope_import(folder, out, cfg, (Qwen3VLCausalLM, llm_state, tokenizer), recipe, vision_state,
                              (connector_state, "vision mergers", "visual.merger(mapped) "), cap=32768)


def _is_moe(model) -> bool:
    return model.llm.config.model_type == "qwen3_vl_moe_text"


def _reference_classes(model) -> tuple[type, type]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    return (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if _is_moe(model) else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)


def qwen3_vl_reference(model) -> nn.Module:
    """`Qwen3VLForConditionalGeneration` (`Qwen3VLMoeForConditionalGeneration` over a
    mixture-of-experts decoder) holding the weights of a model with the `qwen3-vit` tower and the
    `qwen3-vl-merger` connector."""
    config_cls, model_cls = _reference_classes(model)

    tower, conn = model.vision.model, model.connector
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
        "temporal_patch_size", "num_position_embeddings", "deepstack_visual_indexes", "rope_parameters")}
    text, text_state = text_part(model)
    config = config_cls(text_config=text, vision_config={**vision, "out_hidden_size": conn.llm_dim},
                           image_token_id=model.image_token_id, video_token_id=model.video_token_id or model.image_token_id,
                           tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = model_cls(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    inverse = {ours: theirs for theirs, ours in _MERGER.items()}
    for ours, theirs in (("main.", "merger."), *((f"levels.{k}.", f"deepstack_merger_list.{k}.") for k in range(conn.feature_levels))):
        state |= {f"model.visual.{theirs}{inverse[k[len(ours):]]}": v for k, v in conn.state_dict().items() if k.startswith(ours)}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


@torch.no_grad()
def export_qwen3_vl(model, out: str | Path) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmkit.families.qwen2_vl.hf import _qwen2_vl_video_settings

    ref = qwen3_vl_reference(model).eval()
    tok = model.tokenizer
    set_vision_token_ids(ref.config, tok)
    ref.generation_config = hf_generation_config(tok)
    p = model.config.processor
    o = p.options
    image_processor = mrope_image_processor(Qwen2VLImageProcessorPil, p, 65536, 16777216, 16)
    files = {}
    if getattr(model.config, "video_token", None) and (o.get("video_min_pixels") or o.get("video_max_pixels")):
        files["video_preprocessor_config.json"] = _qwen2_vl_video_settings(model) | {"video_processor_type": "Qwen3VLVideoProcessor"}
    return write_export(out, ref, tok, {"processor_class": "Qwen3VLProcessor", "image_token": model.config.image_token},
                        image_processor, files)


def _reference_inputs(model, prompt, ids):
    return _reference_classes(model)[1], mrope_reference_inputs(model, prompt, ids)


def _is_qwen3_vl(model) -> bool:
    return isinstance(model.vision, Qwen3ViTTower)


QWEN3_VL = HFFamily(("qwen3_vl", "qwen3_vl_moe"), "Qwen3-VL, Qwen3-VL-MoE (Qwen3VLForConditionalGeneration, "
                    "Qwen3VLMoeForConditionalGeneration)", import_qwen3_vl, export_qwen3_vl, _is_qwen3_vl, _reference_inputs,
                    specificity=2, model_type_of=lambda model: "qwen3_vl_moe" if _is_moe(model) else "qwen3_vl")
