"""LLaVA-NeXT (`llava_next`): import and export.

A SigLIP / CLIP tower (`hf-random` + the folder's weights), the 2-layer GELU projector (`mlp`)
plus `image_newline`, any transformers causal LM, and the `anyres` processor with the folder's
pinpoints. LLaVA-OneVision (`llava_onevision`) reuses the import with its `anyres-max` processor.

`llava_next(model)` is transformers' `LlavaNextForConditionalGeneration` holding a vlmkit model's
weights (parity checks and `benchmarks/train_step.py`); `llava_next_inputs` batches vlmkit-encoded
samples the way it takes them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

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
from vlmkit.hf.reference import language_model_state, load_strict, projector_state, text_part, vision_feature_settings
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import build_imported, hf_generation_config, save_with_processor, stage_llm, write_checkpoint


def import_llava_next(folder: Path, out: Path, processor: str = "anyres", processor_options: dict | None = None,
                      video_token: str | None = None) -> Path:
    """LLaVA-NeXT; with `processor="anyres-max"` and its options, LLaVA-OneVision (same weights
    and layout, capped feature maps, base-view images in multi-image prompts); with
    `processor="anyres-video"` and the video token, LLaVA-NeXT-Video."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if vision_cfg.model_type not in ("siglip_vision_model", "clip_vision_model"):
        raise ExportError(f"vision tower {vision_cfg.model_type!r}: import supports SigLIP and CLIP towers")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    has_cls = vision_cfg.model_type.startswith("clip")
    if (cfg.vision_feature_select_strategy == "default") != has_cls:
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a {vision_cfg.model_type} "
                          "tower: vlmkit drops the CLS token exactly when the tower has one")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP connector uses exact GELU")
    feature_layer = cfg.vision_feature_layer
    if feature_layer == -1 and not getattr(vision_cfg, "tie_last_hidden_states", False):
        # LLaVA reads hidden_states[-1] (before any final norm); vlmkit's -1 is the tower's output.
        feature_layer = vision_cfg.num_hidden_layers

    state = read_weights(folder)
    parts = split_state(state, {
        "vision_tower.": "vision", "model.vision_tower.": "vision",
        "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
        "image_newline": "newline", "model.image_newline": "newline",
        "language_model.model.": "llm", "model.language_model.": "llm",
        "language_model.lm_head.": "head", "lm_head.": "head"})
    if "" not in parts["newline"]:
        raise ExportError(f"{folder}: image_newline is missing")
    p = parts["projector"]
    if "linear_1.weight" not in p or "linear_2.weight" not in p:
        raise ExportError(f"{folder}: multi_modal_projector.linear_1 / linear_2 weights are missing")
    zeros = lambda w: torch.zeros(w.shape[0])  # noqa: E731  (a bias-free projector is bias = 0)
    connector_state = {"fc1.weight": p["linear_1.weight"], "fc1.bias": p.get("linear_1.bias", zeros(p["linear_1.weight"])),
                       "fc2.weight": p["linear_2.weight"], "fc2.bias": p.get("linear_2.bias", zeros(p["linear_2.weight"])),
                       "image_newline": parts["newline"][""]}
    llm_state = causal_lm_state(parts)

    settings = image_processor_settings(folder)
    crop = settings.get("crop_size") or {}
    tile = crop.get("height") or (settings.get("size") or {}).get("shortest_edge") or vision_cfg.image_size
    if tile != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's tile size {tile} differs from the vision tower's image_size {vision_cfg.image_size}")
    pinpoints = settings.get("image_grid_pinpoints") or cfg.image_grid_pinpoints
    processor_cfg = read_json(folder / "processor_config.json")
    image_token = processor_cfg.get("image_token", "<image>")
    tokenizer = folder_tokenizer(folder, image_token)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": hf_config_dict(vision_cfg),
                       "feature_layer": feature_layer},
            "connector": {"name": "mlp", "options": {"hidden_size": p["linear_1.weight"].shape[0]}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": processor, "image_size": tile, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings),
                          "options": {"patch_size": vision_cfg.patch_size, "grid_pinpoints": [list(x) for x in pinpoints],
                                      "sentinels": "never", **(processor_options or {})}},
            "image_token": image_token, "video_token": video_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_index)
        load_part(model.vision.model, parts["vision"], "vision tower", "vision_tower.")
        load_part(model.connector, connector_state, "projector", "multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def llava_next(model) -> nn.Module:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    proc = model.image_processor
    tower = model.vision.model
    conn = model.connector
    if model.config.processor.name != "anyres" or not proc.learned_newline:
        raise ValueError("LLaVA-NeXT needs the anyres processor with unpadding and newlines")
    layer, strategy, tie_last = vision_feature_settings(model)
    text, text_state = text_part(model)
    config = LlavaNextConfig(
        vision_config={**tower.config.to_dict(), "tie_last_hidden_states": tie_last},
        text_config=text,
        image_token_index=model.image_token_id, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints],
        tie_word_embeddings=model.llm.config.tie_word_embeddings,
    )
    ref = LlavaNextForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state |= projector_state(conn) | {"model.image_newline": conn.image_newline}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


def llava_next_inputs(encoded: list, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `pixel_values` (B, max views, 3, S, S) and `image_sizes`
    for LlavaNext from vlmkit-encoded samples with one image each (right-padded)."""
    longest = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = e.input_ids
        mask[i, : len(e.input_ids)] = 1
    views = max(e.images[0].pixel_values.shape[0] for e in encoded)
    first = encoded[0].images[0].pixel_values
    pixels = first.new_zeros((len(encoded), views, *first.shape[1:]))
    for i, e in enumerate(encoded):
        pv = e.images[0].pixel_values
        pixels[i, : pv.shape[0]] = pv
    sizes = torch.tensor([list(e.images[0].image_size) for e in encoded])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


@torch.no_grad()
def export_llava_next(model, out: str | Path) -> Path:
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ref = llava_next(model).eval()
    tok = model.tokenizer
    ref.generation_config = hf_generation_config(tok)
    p = model.config.processor
    s = p.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=[list(x) for x in model.image_processor.grid_pinpoints],
        image_mean=list(p.mean), image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=model.vision.patch_size,
                                   vision_feature_select_strategy=ref.config.vision_feature_select_strategy,
                                   chat_template=plain_template(tok), image_token=model.config.image_token,
                                   num_additional_image_tokens=1 if model.vision.has_cls else 0)

    return save_with_processor(ref, processor, out)


def _llava_next_reference(model, prompt, ids):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values[None],
                                               "image_sizes": torch.tensor([list(prompt.images[0].image_size)])}


LLAVA_NEXT = HFFamily(("llava_next",), "LLaVA-NeXT (LlavaNextForConditionalGeneration)", import_llava_next,
                      export_llava_next, processor_is("anyres"), _llava_next_reference, specificity=1)
