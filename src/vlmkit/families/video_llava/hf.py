"""Video-LLaVA (`video_llava`, transformers' `VideoLlavaForConditionalGeneration`): import and
export.

Two CLIP-shaped towers of one config (`image-video-random` + the folder's `image_tower` and
`video_tower` weights), the 2-layer GELU projector (`mlp`) both share, any transformers causal
LM, and the `video-llava` processor with the folder's crop size and normalisation. Images fill
the `<image>` slots (grid tokens, CLS dropped), video frames the `<video>` slots (grid + 1 tokens
each, CLS kept).

Export writes `VideoLlavaForConditionalGeneration`'s config and weights, the image processor
(`VideoLlavaImageProcessor`, which runs without torchvision), `video_preprocessor_config.json`
(the video processor needs torchvision, so its settings are written as JSON), the tokenizer, the
chat template and `processor_config.json`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.llava_next_video.hf import RESAMPLE_IDS, frame_processor_settings, video_processor_config, video_settings
from vlmkit.families.video_llava.model import ImageVideoTowers
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_from_state,
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
from vlmkit.hf.reference import finished_reference, language_model_state, projector_state, text_part, vision_feature_settings
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import folder_tokenizer
from vlmkit.hf.writing import build_imported, stage_llm, write_checkpoint, write_export


def _check_config(cfg) -> int:
    """The feature layer vlmkit reads both towers at; refuses what it cannot express."""
    vision_cfg = cfg.vision_config
    if vision_cfg.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ExportError(f"vision tower {vision_cfg.model_type!r}: import supports CLIP and SigLIP towers")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    if (cfg.vision_feature_select_strategy == "default") != vision_cfg.model_type.startswith("clip"):
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a {vision_cfg.model_type} "
                          "tower: vlmkit drops an image's CLS token exactly when the tower has one")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP connector uses exact GELU")
    # hidden_states[-1] is the last layer's output, before any final norm: vlmkit's layer L.
    return vision_cfg.num_hidden_layers if cfg.vision_feature_layer == -1 else cfg.vision_feature_layer


def _parts(folder: Path) -> dict:
    state = read_weights(folder)
    parts = split_state(state, {
        "image_tower.": "image", "model.image_tower.": "image", "video_tower.": "video", "model.video_tower.": "video",
        "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
        "language_model.model.": "llm", "model.language_model.": "llm", "language_model.lm_head.": "head", "lm_head.": "head"})
    p = parts["projector"]
    if "linear_1.weight" not in p or "linear_2.weight" not in p:
        raise ExportError(f"{folder}: multi_modal_projector.linear_1 / linear_2 weights are missing")
    zeros = lambda w: torch.zeros(w.shape[0])  # a bias-free projector is bias = 0
    parts["connector"] = {"fc1.weight": p["linear_1.weight"], "fc1.bias": p.get("linear_1.bias", zeros(p["linear_1.weight"])),
                          "fc2.weight": p["linear_2.weight"], "fc2.bias": p.get("linear_2.bias", zeros(p["linear_2.weight"]))}
    parts["causal"] = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    return parts


def import_video_llava(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg = cfg.vision_config
    feature_layer = _check_config(cfg)
    parts = _parts(folder)
    settings = image_processor_settings(folder)
    crop = (settings.get("crop_size") or {}).get("height") or vision_cfg.image_size
    short = (settings.get("size") or {}).get("shortest_edge", crop)
    if crop != vision_cfg.image_size or short != crop:
        raise ExportError(f"{folder}: the image processor resizes the short side to {short} and crops {crop}; vlmkit reads "
                          f"the tower's {vision_cfg.image_size} px for both")
    video = video_settings(folder, settings)
    if video.get("video_size", crop) != crop:
        raise ExportError(f"{folder / 'video_preprocessor_config.json'}: frames of {video['video_size']} px; the towers read {crop} px")
    processor_cfg = read_json(folder / "processor_config.json")
    image_token, video_token = processor_cfg.get("image_token", "<image>"), processor_cfg.get("video_token", "<video>")
    tokenizer = folder_tokenizer(folder, image_token)
    options = {"patch_size": vision_cfg.patch_size, "cls": vision_cfg.model_type.startswith("clip"), "sentinels": "never"}
    if "video" in video:
        options["video"] = video["video"]

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(cfg.text_config, parts["causal"], cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "image-video-random", "model_type": vision_cfg.model_type, "config": hf_config_dict(vision_cfg),
                       "feature_layer": feature_layer},
            "connector": {"name": "mlp", "options": {"hidden_size": parts["connector"]["fc1.weight"].shape[0]}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "video-llava", "image_size": crop, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings), "options": options},
            "image_token": image_token, "video_token": video_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_index)
        if model.video_token_id != cfg.video_token_index:
            raise ExportError(f"{folder}: the tokenizer maps {video_token!r} to {model.video_token_id}, config.json's "
                              f"video_token_index is {cfg.video_token_index}")
        load_part(model.vision.image.model, parts["image"], "image tower", "image_tower.")
        load_part(model.vision.video.model, parts["video"], "video tower", "video_tower.")
        load_part(model.connector, parts["connector"], "projector", "multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(cfg.text_config, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def video_llava_reference(model):
    """transformers' VideoLlavaForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    towers, conn = model.vision, model.connector
    if not isinstance(towers, ImageVideoTowers) or model.video_token_id is None:
        raise ExportError("Video-LLaVA needs the image-video-random towers and a video token")
    layer, strategy, _ = vision_feature_settings(model)
    text, text_state = text_part(model)
    config = VideoLlavaConfig(
        vision_config=towers.image.model.config.to_dict(), text_config=text, image_token_index=model.image_token_id,
        video_token_index=model.video_token_id, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = VideoLlavaForConditionalGeneration(config)
    state = {f"model.image_tower.{k}": v for k, v in towers.image.model.state_dict().items()}
    state |= {f"model.video_tower.{k}": v for k, v in towers.video.model.state_dict().items()}
    state |= projector_state(conn)
    state |= language_model_state(text_state)
    return finished_reference(ref, state, model)


@torch.no_grad()
def export_video_llava(model, out: str | Path) -> Path:
    from transformers import VideoLlavaImageProcessor

    ref = video_llava_reference(model)
    tok = model.tokenizer
    p = model.config.processor
    s = p.image_size
    common = {"image_mean": list(p.mean), "image_std": list(p.std), "resample": RESAMPLE_IDS[p.resample]}
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **common)
    return write_export(out, ref, tok, video_processor_config(model, ref, "VideoLlavaProcessor"), image_processor,
                        {"video_preprocessor_config.json": frame_processor_settings(p, "VideoLlavaVideoProcessor", s)})


def video_llava_inputs(prompt) -> dict:
    """transformers' keyword inputs for one vlmkit-encoded prompt: `pixel_values` (images,
    3, S, S) and `pixel_values_videos` (1, frames, 3, S, S) for its one video."""
    images = [im.pixel_values for im in prompt.images if im.views[0].role != "frame"]
    frames = [im.pixel_values for im in prompt.images if im.views[0].role == "frame"]
    out = {}
    if images:
        out["pixel_values"] = torch.cat(images)
    if frames:
        out["pixel_values_videos"] = torch.cat(frames)[None]
    return out


def _reference(model, prompt, ids):
    from transformers import VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration, video_llava_inputs(prompt)


VIDEO_LLAVA = HFFamily(("video_llava",), "Video-LLaVA (VideoLlavaForConditionalGeneration)", import_video_llava, export_video_llava,
                       processor_is("video-llava"), _reference, specificity=10)
