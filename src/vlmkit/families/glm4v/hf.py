"""GLM-4.1V (`glm4v`): import and export.

The `glm4v-vit` tower (with its 2x2 downsample convolution), its PatchMerger as the
`glm4v-merger` connector, the partial-rotary M-RoPE decoder (`glm4v-text`), and the `glm4v`
processor (the clip-wide smart_resize of an image as `temporal_patch_size` frames, with the
folder's pixel bounds, patch, merge, mean/std). Imported models never write vlmkit's
`<image_k>` sentinels.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vlmkit.families.glm4v.model import Glm4vCausalLM, Glm4vViTTower
from vlmkit.families.qwen2_vl.hf import (
    MROPE_LAYOUT,
    RESAMPLE,
    folder_image_token,
    mrope_image_processor,
    mrope_reference_inputs,
    patch_and_merge,
    write_mrope_import,
)
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


def _processor_options(folder: Path, vision_cfg) -> tuple[dict, dict]:
    settings = image_processor_settings(folder)
    patch, merge = patch_and_merge(folder, settings, vision_cfg)
    size = settings.get("size") or {}
    options = {"patch_size": patch, "merge_size": merge,
               "temporal_patch_size": settings.get("temporal_patch_size", vision_cfg.temporal_patch_size),
               "min_pixels": int(size.get("shortest_edge") or 112 * 112), "max_pixels": int(size.get("longest_edge") or 28 * 28 * 15000),
               "sentinels": "never"}
    return settings, options


def _video_options(folder: Path, processor_cfg: dict) -> dict:
    """Glm4vVideoProcessor's settings (its defaults where the folder is silent): the clip's pixel
    bounds, temporal patches, and its frame sampler at `fps` frames per second."""
    settings = read_json(folder / "video_preprocessor_config.json") or processor_cfg.get("video_processor") or {}
    size = settings.get("size") or {}
    video = {"compression": "temporal-patch", "sampling": "glm4v", "fps": float(settings.get("fps") or 2.0)}
    return {"video_min_pixels": int(size.get("shortest_edge") or 112 * 112),
            "video_max_pixels": int(size.get("longest_edge") or 28 * 28 * 2 * 30000), "video": video}


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GLM-4.5V folders store each expert's gate / up / down projections apart; transformers 5
    holds them fused per layer, `gate_up_proj` (experts, 2 x width, hidden: gate rows, then up)
    and `down_proj` (experts, hidden, width), as its loader converts them."""
    out, experts = {}, {}
    for key, value in state.items():
        match = _EXPERT.match(key)
        if match:
            experts.setdefault(match[1], {}).setdefault(match[3], {})[int(match[2])] = value
        else:
            out[key] = value
    for prefix, parts in experts.items():
        n = len(parts.get("down_proj", {}))
        if any(sorted(parts.get(name, {})) != list(range(n)) for name in ("gate_proj", "up_proj", "down_proj")):
            raise ExportError(f"{prefix}: the experts' gate / up / down projections are incomplete")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    return out


def import_glm4v(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    cfg = auto_config(folder)
    parts = split_state(read_weights(folder), MROPE_LAYOUT)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if vision_cfg.out_hidden_size != text_cfg.hidden_size:
        raise ExportError(f"{folder}: vision out_hidden_size {vision_cfg.out_hidden_size} differs from the text hidden_size "
                          f"{text_cfg.hidden_size}")
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith(("merger.", "downsample."))}
    connector_state = {k[len("merger."):]: v for k, v in parts["vision"].items() if k.startswith("merger.")}
    connector_state |= {k: v for k, v in parts["vision"].items() if k.startswith("downsample.")}
    llm_state = causal_lm_state(parts | {"llm": fuse_experts(parts["llm"])})
    settings, options = _processor_options(folder, vision_cfg)
    processor_cfg, _, image_token, tokenizer = folder_image_token(folder, cfg)

    def recipe(staged_llm: Path) -> dict:
        return {
            "vision": {"name": "glm4v-vit", "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "glm4v-merger", "options": {"hidden_size": vision_cfg.intermediate_size, "act": vision_cfg.hidden_act,
                                                              "merge": vision_cfg.spatial_merge_size}},
            "llm": {"name": "glm4v-text", "path": str(staged_llm)},
            "processor": {"name": "glm4v", "image_size": options["patch_size"] * options["merge_size"] * 8,
                          "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                          "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                          "resample": resample_name(settings), "options": options | _video_options(folder, processor_cfg)},
            "image_token": image_token,
        }

    return write_mrope_import(folder, out, cfg, (Glm4vCausalLM, llm_state, tokenizer), recipe, vision_state,
                              (connector_state, "vision downsample and merger", "visual.(merger.)"), cap=32768)


def _is_moe(model) -> bool:
    return model.llm.config.model_type == "glm4v_moe_text"


def _reference_classes(model) -> tuple[type, type]:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    return (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if _is_moe(model) else (Glm4vConfig, Glm4vForConditionalGeneration)


def glm4v_reference(model) -> nn.Module:
    """`Glm4vForConditionalGeneration` (GLM-4.5V: `Glm4vMoeForConditionalGeneration`) holding the
    weights of a model with the `glm4v-vit` tower and the `glm4v-merger` connector."""
    config_cls, model_cls = _reference_classes(model)

    tower, conn = model.vision.model, model.connector
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "hidden_size", "hidden_act", "attention_bias", "num_heads", "in_channels", "image_size", "patch_size",
        "rms_norm_eps", "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "intermediate_size", "rope_parameters")}
    text, text_state = text_part(model)
    vocab = model.tokenizer.get_vocab()
    ids = {name: vocab[token] for name, token in (("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
                                                   ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"),
                                                   ("video_token_id", "<|video|>")) if token in vocab}
    config = config_cls(text_config=text, vision_config=vision, image_token_id=model.image_token_id,
                         tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)), **ids)
    ref = model_cls(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    state |= {f"model.visual.{k if k.startswith('downsample.') else 'merger.' + k}": v for k, v in conn.state_dict().items()}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


@torch.no_grad()
def export_glm4v(model, out: str | Path) -> Path:
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    ref = glm4v_reference(model).eval()
    tok = model.tokenizer
    ref.generation_config = hf_generation_config(tok)
    p = model.config.processor
    o = p.options
    video = {"video_processor_type": "Glm4vVideoProcessor", "patch_size": o.get("patch_size", 14), "merge_size": o.get("merge_size", 2),
             "temporal_patch_size": o.get("temporal_patch_size", 2), "image_mean": list(p.mean), "image_std": list(p.std),
             "size": {"shortest_edge": o.get("video_min_pixels", 112 * 112), "longest_edge": o.get("video_max_pixels", 28 * 28 * 2 * 30000)},
             "fps": (o.get("video") or {}).get("fps", 2.0), "resample": RESAMPLE[p.resample]}
    image_processor = mrope_image_processor(Glm4vImageProcessorPil, p, 112 * 112, 28 * 28 * 15000, 14)
    return write_export(out, ref, tok, {"processor_class": "Glm4vProcessor", "image_token": model.config.image_token},
                        image_processor, {"video_preprocessor_config.json": video})


def _reference_inputs(model, prompt, ids):
    return _reference_classes(model)[1], mrope_reference_inputs(model, prompt, ids)


def _is_glm4v(model) -> bool:
    return isinstance(model.vision, Glm4vViTTower)


GLM4V = HFFamily(("glm4v", "glm4v_moe"), "GLM-4.1V, GLM-4.5V (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration)",
                 import_glm4v, export_glm4v, _is_glm4v, _reference_inputs, specificity=2,
                 model_type_of=lambda model: "glm4v_moe" if _is_moe(model) else "glm4v")
