"""LLaVA-NeXT-Video (`llava_next_video`, transformers' `LlavaNextVideoForConditionalGeneration`).

Its weights and image path are LLaVA-NeXT's (CLIP / SigLIP tower, 2-layer GELU projector,
`image_newline`, any causal LM, AnyRes), so the import is LLaVA-NeXT's
(`families/llava_next/hf.py`) with the `anyres-video` processor: each sampled video frame is a
square crop read by the same tower, its feature map pooled (`spatial_pool_mode`,
`spatial_pool_stride`) and projected, the frames' tokens filling the folder's `<video>` slots. A
`conv` pool has weights vlmkit has no part for and is refused.

Export writes `LlavaNextVideoForConditionalGeneration`'s config and weights, the PIL image
processor's settings, `video_preprocessor_config.json` (the video processor needs torchvision,
so its settings are written as JSON), the tokenizer, the chat template and `processor_config.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.families.llava_next.hf import import_llava_next
from vlmkit.families.llava_next_video.processor import AnyResVideoProcessor
from vlmkit.hf.folder import ExportError, image_processor_settings, read_json
from vlmkit.hf.reference import finished_reference, language_model_state, projector_state, text_part, vision_feature_settings
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.writing import write_export

RESAMPLE_IDS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _side(settings: dict, key: str) -> int | None:
    value = settings.get(key)
    if isinstance(value, dict):
        return value.get("shortest_edge") or value.get("height")
    return value


def video_settings(folder: Path, image_settings: dict) -> dict:
    """The frame crop side and sampling of `video_preprocessor_config.json`, checked against what
    vlmkit's frame rule reads (a short side resized to the crop side, the image's mean and std)."""
    path = folder / "video_preprocessor_config.json"
    settings = read_json(path)
    if not settings:
        return {}
    size, crop = _side(settings, "size"), _side(settings, "crop_size")
    if settings.get("do_center_crop", True) and crop and size and crop != size:
        raise ExportError(f"{path}: the short side is resized to {size} and cropped to {crop}; vlmkit's frames resize "
                          "the short side to the crop side")
    for key in ("image_mean", "image_std"):
        if key in settings and key in image_settings and [round(x, 6) for x in settings[key]] != [round(x, 6) for x in image_settings[key]]:
            raise ExportError(f"{path}: the video {key} {settings[key]} differs from the image processor's {image_settings[key]}")
    options: dict = {"video_size": crop or size}
    if settings.get("do_sample_frames") and settings.get("num_frames"):
        options["video"] = {"sampling": "uniform", "num_frames": int(settings["num_frames"])}
    return options


def import_llava_next_video(folder: Path, out: Path) -> Path:
    folder = Path(folder)
    cfg = read_hf_config(folder)
    mode, stride = cfg.get("spatial_pool_mode", "average"), int(cfg.get("spatial_pool_stride", 2))
    if mode not in ("average", "max"):
        raise ExportError(f"{folder / 'config.json'}: spatial_pool_mode {mode!r}: vlmkit pools frames by 'average' or 'max' "
                          "(a 'conv' pool has weights vlmkit has no part for)")
    options = {"video_pool": [mode, stride], **{k: v for k, v in video_settings(folder, image_processor_settings(folder)).items() if v}}
    processor_cfg = read_json(folder / "processor_config.json")
    return import_llava_next(folder, out, processor="anyres-video", processor_options=options,
                             video_token=processor_cfg.get("video_token", "<video>"))


@torch.no_grad()
def next_video_reference(model):
    """transformers' LlavaNextVideoForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    proc, tower, conn = model.image_processor, model.vision.model, model.connector
    if not isinstance(proc, AnyResVideoProcessor) or model.video_token_id is None:
        raise ExportError("LLaVA-NeXT-Video needs the anyres-video processor and a video token")
    layer, strategy, tie_last = vision_feature_settings(model)
    text, text_state = text_part(model)
    mode, stride = proc.frames.pool
    config = LlavaNextVideoConfig(
        vision_config={**tower.config.to_dict(), "tie_last_hidden_states": tie_last}, text_config=text,
        image_token_index=model.image_token_id, video_token_index=model.video_token_id, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", spatial_pool_mode=mode, spatial_pool_stride=stride,
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints], tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = LlavaNextVideoForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state |= projector_state(conn) | {"model.image_newline": conn.image_newline}
    state |= language_model_state(text_state)
    return finished_reference(ref, state, model)


@torch.no_grad()
def export_llava_next_video(model, out: str | Path) -> Path:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ref = next_video_reference(model)
    tok = model.tokenizer
    p, proc = model.config.processor, model.image_processor
    s, frame = p.image_size, proc.frames.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=[list(x) for x in proc.grid_pinpoints],
        image_mean=list(p.mean), image_std=list(p.std), resample=RESAMPLE_IDS[p.resample])
    return write_export(out, ref, tok, video_processor_config(model, ref, "LlavaNextVideoProcessor"), image_processor,
                        {"video_preprocessor_config.json": frame_processor_settings(p, "LlavaNextVideoVideoProcessor", frame)})


def frame_processor_settings(p, video_processor_type: str, size: int) -> dict:
    """A LLaVA-style video processor's settings (written as JSON: the class itself needs
    torchvision): frames resized to `size` on the short side and center-cropped square, the
    processor's mean, std and resampling, uniform frame sampling when the recipe samples."""
    video = dict(p.options.get("video") or {})
    return {"video_processor_type": video_processor_type, "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size}, "do_center_crop": True, "default_to_square": False,
            "image_mean": list(p.mean), "image_std": list(p.std), "resample": RESAMPLE_IDS[p.resample],
            "do_sample_frames": video.get("sampling") == "uniform", "num_frames": video.get("num_frames", 8)}


def video_processor_config(model, ref, processor_class: str) -> dict:
    """`processor_config.json` of a LLaVA-style processor with image and video tokens."""
    return {"processor_class": processor_class, "patch_size": model.vision.patch_size,
            "vision_feature_select_strategy": ref.config.vision_feature_select_strategy,
            "num_additional_image_tokens": int(model.vision.has_cls), "image_token": model.config.image_token,
            "video_token": model.config.video_token}


def next_video_inputs(prompt) -> dict:
    """transformers' keyword inputs for one vlmkit-encoded prompt: `pixel_values` and
    `image_sizes` of its images, `pixel_values_videos` (videos, frames, 3, S, S) of its videos."""
    images = [im for im in prompt.images if im.views[0].role != "frame"]
    frames = [im.pixel_values for im in prompt.images if im.views[0].role == "frame"]
    out = {}
    if images:
        views = max(im.pixel_values.shape[0] for im in images)
        pixels = images[0].pixel_values.new_zeros((len(images), views, *images[0].pixel_values.shape[1:]))
        for i, im in enumerate(images):
            pixels[i, : im.pixel_values.shape[0]] = im.pixel_values
        out |= {"pixel_values": pixels, "image_sizes": torch.tensor([list(im.image_size) for im in images])}
    if frames:
        out["pixel_values_videos"] = torch.cat(frames)[None]
    return out


def _reference(model, prompt, ids):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration, next_video_inputs(prompt)


LLAVA_NEXT_VIDEO = HFFamily(("llava_next_video",), "LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration)",
                            import_llava_next_video, export_llava_next_video, processor_is("anyres-video"), _reference,
                            specificity=10)
