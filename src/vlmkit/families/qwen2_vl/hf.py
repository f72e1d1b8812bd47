"""Qwen2-VL and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`): import and export.

The `qwen2-vit` tower (Qwen2.5-VL: `qwen2.5-vit`, windowed attention, RMSNorm, SwiGLU), the
PatchMerger as a pre-norm 2x2 `pixel-shuffle` connector (Qwen2.5-VL: an RMSNorm before the
merge), the M-RoPE decoder (`qwen2-vl-text`), and the `qwen2vl` processor (smart_resize with
the folder's min/max pixels, patch, merge, mean/std; the video processor's frame settings).
Imported models never write vlmkit's `<image_k>` sentinels (`sentinels: never`): the released
checkpoints were not trained with them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from vlmkit.config import load_config
from vlmkit.families.qwen2_vl.model import MRopeCausalLM, Qwen2ViTTower, Qwen25ViTTower, save_mrope_llm
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_state,
    check_part,
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
from vlmkit.hf.reference import language_model_state, load_strict, text_part
from vlmkit.hf.registry import HFFamily, family_of, read_hf_config
from vlmkit.hf.templates import folder_tokenizer
from vlmkit.hf.writing import build_imported, hf_generation_config, write_checkpoint, write_export

RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def patch_and_merge(folder: Path, settings: dict, vision_cfg) -> tuple[int, int]:
    """The image processor's patch and merge sizes, which must be the vision config's."""
    patch, merge = settings.get("patch_size", vision_cfg.patch_size), settings.get("merge_size", vision_cfg.spatial_merge_size)
    if patch != vision_cfg.patch_size or merge != vision_cfg.spatial_merge_size:
        raise ExportError(f"{folder}: the image processor's patch/merge ({patch}, {merge}) differ from the vision "
                          f"config's ({vision_cfg.patch_size}, {vision_cfg.spatial_merge_size})")
    return patch, merge


def stage_mrope_llm(cfg, llm_cls: type, llm_state: dict[str, torch.Tensor], tokenizer, staged_llm: Path) -> None:
    """Load the decoder's weights into `llm_cls(cfg.text_config)` and write it where the M-RoPE text
    builders load it (`save_mrope_llm`). The head is tied by the outer config alone, as transformers
    does: a tied head is the embedding, whatever the file holds."""
    text_cfg = cfg.text_config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    text_cfg.tie_word_embeddings = tied  # the decoder folder carries the outer config's flag
    if tied:
        llm_state.pop("lm_head.weight", None)
    optional = ("rotary", "inv_freq") + (("lm_head.weight",) if tied else ())
    with torch.device("meta"):  # shapes first: a config larger than its weights allocates nothing
        check_part(llm_cls(text_cfg), llm_state, "language model", optional=optional)
    llm = llm_cls(text_cfg)
    load_part(llm, llm_state, "language model", optional=optional)
    save_mrope_llm(llm, tokenizer, staged_llm)


# transformers 5 saves these models in the original layout (visual.*, model.*, lm_head.*); the
# in-memory layout (model.visual.*, model.language_model.*) is accepted too.
MROPE_LAYOUT = {"visual.": "vision", "model.visual.": "vision", "model.language_model.": "llm", "model.": "llm", "lm_head.": "head"}


def folder_image_token(folder: Path, cfg) -> tuple[dict, object, str, object]:
    """(processor_config.json, the folder's tokenizer as it loads, the image token, the tokenizer
    that holds it): the processor's image token, else the token of the config's image_token_id."""
    processor_cfg = read_json(folder / "processor_config.json")
    probe = load_tokenizer(folder)
    image_token = processor_cfg.get("image_token") or probe.convert_ids_to_tokens(cfg.image_token_id)
    return processor_cfg, probe, image_token, folder_tokenizer(folder, image_token)


def write_mrope_import(folder: Path, out: Path, cfg, llm: tuple[type, dict, object], recipe, vision_state: dict,
                       connector: tuple[dict, str, str], cap: int | None = None) -> Path:
    """Stage the decoder (`llm`: its class, weights and tokenizer), build the model whose recipe
    `recipe(staged_llm)` gives (the `model` section), load the tower's weights and the connector's
    ((weights, what, key prefix)) into it and write it as the checkpoint `out`."""
    tmp = staging_folder(out)
    try:
        staged_llm = tmp / "llm"
        stage_mrope_llm(cfg, *llm, staged_llm)
        model_section = recipe(staged_llm)
        config = load_config({"model": model_section})
        model = build_imported(config, model_section["image_token"], cfg.image_token_id)
        load_part(model.vision.model, vision_state, "vision tower", "visual.")
        load_part(model.connector, *connector)
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(cfg.text_config, 4096, cap=cap))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_qwen2_vl(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    qwen25 = read_hf_config(folder)["model_type"] == "qwen2_5_vl"
    cfg = auto_config(folder)
    parts = split_state(read_weights(folder), MROPE_LAYOUT)
    vision_cfg = cfg.vision_config
    merge = vision_cfg.spatial_merge_size
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith("merger.")}
    merger = {k[len("merger."):]: v for k, v in parts["vision"].items() if k.startswith("merger.")}
    connector_state = {"norm.weight": merger.get("ln_q.weight"), "norm.bias": merger.get("ln_q.bias"),
                       "proj.0.weight": merger.get("mlp.0.weight"), "proj.0.bias": merger.get("mlp.0.bias"),
                       "proj.2.weight": merger.get("mlp.2.weight"), "proj.2.bias": merger.get("mlp.2.bias")}
    if qwen25:  # Qwen2.5-VL's merger norm is an RMSNorm: no bias
        del connector_state["norm.bias"]
    # Qwen2-VL's tower width is embed_dim (hidden_size is the merger's output); Qwen2.5-VL's is hidden_size.
    width = vision_cfg.hidden_size if qwen25 else vision_cfg.embed_dim
    if any(v is None for v in connector_state.values()):
        raise ExportError(f"{folder}: the vision merger's weights (visual.merger.ln_q / mlp.0 / mlp.2) are incomplete")
    llm_state = causal_lm_state(parts)

    settings = image_processor_settings(folder)
    patch, _ = patch_and_merge(folder, settings, vision_cfg)
    size = settings.get("size") or {}
    min_pixels = settings.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = settings.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    processor_cfg, probe, image_token, tokenizer = folder_image_token(folder, cfg)
    video_token, video_options = _qwen2_vl_video(folder, cfg, probe, processor_cfg)

    def recipe(staged_llm: Path) -> dict:
        return {
            "vision": {"name": "qwen2.5-vit" if qwen25 else "qwen2-vit", "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 1 / merge, "norm": "pre", "norm_eps": 1e-6,
                                                               "norm_kind": "rmsnorm" if qwen25 else "layernorm",
                                                               "hidden_size": width * merge**2}},
            "llm": {"name": "qwen2-vl-text", "path": str(staged_llm)},
            "processor": {"name": "qwen2vl", "image_size": patch * merge * 8,
                          "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                          "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                          "resample": resample_name(settings),
                          "options": {"patch_size": patch, "merge_size": merge,
                                      "temporal_patch_size": settings.get("temporal_patch_size", vision_cfg.temporal_patch_size),
                                      "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
                                      "sentinels": "never", **video_options}},
            "image_token": image_token,
            "video_token": video_token,
        }

    return write_mrope_import(folder, out, cfg, (MRopeCausalLM, llm_state, tokenizer), recipe, vision_state,
                              (connector_state, "vision merger", "visual.merger(mapped) "))


def _qwen2_vl_video(folder: Path, cfg, tokenizer, processor_cfg: dict) -> tuple[str | None, dict]:
    """Qwen2-VL's video side: its own slot token (<|video_pad|>) and the video processor's
    settings (`video_preprocessor_config.json`): frames in temporal patches, the frames'
    smart_resize bounds, and frame sampling when the folder turns it on."""
    video_id = getattr(cfg, "video_token_id", None)
    token = processor_cfg.get("video_token") or (tokenizer.convert_ids_to_tokens(video_id) if video_id is not None else None)
    if not token or token not in tokenizer.get_vocab():
        return None, {}
    settings = read_json(folder / "video_preprocessor_config.json") or processor_cfg.get("video_processor") or {}
    options: dict = {"video": {"compression": "temporal-patch"}}
    size = settings.get("size") or {}
    low, high = settings.get("min_pixels") or size.get("shortest_edge"), settings.get("max_pixels") or size.get("longest_edge")
    if low:
        options["video_min_pixels"] = int(low)
    if high:
        options["video_max_pixels"] = int(high)
    if settings.get("do_sample_frames"):
        if settings.get("num_frames"):
            options["video"] |= {"sampling": "uniform", "num_frames": int(settings["num_frames"])}
        else:
            options["video"] |= {"sampling": "fps", "fps": float(settings.get("fps") or 2.0),
                                 "min_frames": int(settings.get("min_frames") or 4), "max_frames": int(settings.get("max_frames") or 768)}
    return token, options


def qwen2_vl_reference(model) -> nn.Module:
    """`Qwen2VLForConditionalGeneration` holding the weights of a model with the `qwen2-vit` tower
    (its ViT, PatchMerger = our pre-norm pixel shuffle, M-RoPE decoder)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tower = model.vision.model
    conn = model.connector
    if conn.options.norm != "pre" or conn.options.projector != "mlp" or conn.factor != tower.config.spatial_merge_size:
        raise ValueError("Qwen2-VL's PatchMerger is a pre-norm 2-layer pixel shuffle over the merge window")
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "embed_dim", "num_heads", "mlp_ratio", "patch_size", "temporal_patch_size", "spatial_merge_size",
        "in_channels", "hidden_act")}
    text, text_state = text_part(model)
    config = Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": conn.llm_dim},
                           image_token_id=model.image_token_id, video_token_id=model.image_token_id)
    ref = Qwen2VLForConditionalGeneration(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    state |= {"model.visual.merger.ln_q.weight": conn.norm.weight, "model.visual.merger.ln_q.bias": conn.norm.bias,
              "model.visual.merger.mlp.0.weight": conn.proj[0].weight, "model.visual.merger.mlp.0.bias": conn.proj[0].bias,
              "model.visual.merger.mlp.2.weight": conn.proj[2].weight, "model.visual.merger.mlp.2.bias": conn.proj[2].bias}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


def qwen2_5_vl_reference(model) -> nn.Module:
    """`Qwen2_5_VLForConditionalGeneration` for a model with the `qwen2.5-vit` tower (its
    PatchMerger = our pixel shuffle with an RMSNorm before the merge)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tower = model.vision.model
    conn = model.connector
    if conn.options.norm != "pre" or conn.options.norm_kind != "rmsnorm" or conn.factor != tower.config.spatial_merge_size:
        raise ValueError("Qwen2.5-VL's PatchMerger is a pre-RMSNorm 2-layer pixel shuffle over the merge window")
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
        "temporal_patch_size", "tokens_per_second", "window_size", "fullatt_block_indexes", "rope_parameters")}
    text, text_state = text_part(model)
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "out_hidden_size": conn.llm_dim},
                              image_token_id=model.image_token_id, video_token_id=model.image_token_id)
    ref = Qwen2_5_VLForConditionalGeneration(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    state |= {"model.visual.merger.ln_q.weight": conn.norm.weight,
              "model.visual.merger.mlp.0.weight": conn.proj[0].weight, "model.visual.merger.mlp.0.bias": conn.proj[0].bias,
              "model.visual.merger.mlp.2.weight": conn.proj[2].weight, "model.visual.merger.mlp.2.bias": conn.proj[2].bias}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


def _is_qwen25(model) -> bool:
    return isinstance(model.vision, Qwen25ViTTower)


@torch.no_grad()
def export_qwen2_vl(model, out: str | Path) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = (qwen2_5_vl_reference if family_of(model) == "qwen2_5_vl" else qwen2_vl_reference)(model).eval()
    tok = model.tokenizer
    set_vision_token_ids(ref.config, tok)
    ref.config.tie_word_embeddings = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    ref.generation_config = hf_generation_config(tok)
    p = model.config.processor
    o = p.options
    image_processor = mrope_image_processor(Qwen2VLImageProcessorPil, p, 56 * 56, 28 * 28 * 1280, 14)
    files = {}
    if getattr(model.config, "video_token", None) and (o.get("video_min_pixels") or o.get("video_max_pixels")):
        files["video_preprocessor_config.json"] = _qwen2_vl_video_settings(model)
    processor_class = "Qwen2_5_VLProcessor" if family_of(model) == "qwen2_5_vl" else "Qwen2VLProcessor"
    return write_export(out, ref, tok, {"processor_class": processor_class, "image_token": model.config.image_token},
                        image_processor, files)


def set_vision_token_ids(config, tokenizer) -> None:
    """Give the transformers config the ids of Qwen's vision start / end and video tokens the
    tokenizer holds."""
    vocab = tokenizer.get_vocab()
    for name, token in (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                        ("video_token_id", "<|video_pad|>")):
        if token in vocab:
            setattr(config, name, vocab[token])


def mrope_image_processor(cls: type, processor, min_pixels: int, max_pixels: int, patch_size: int):
    """A Qwen2-VL-style image processor (`cls`: its `*Pil` class) with the processor's pixel bounds,
    patch, merge and temporal patch (the given defaults where the options are silent), mean, std and
    resampling."""
    o = processor.options
    return cls(size={"shortest_edge": o.get("min_pixels", min_pixels), "longest_edge": o.get("max_pixels", max_pixels)},
               patch_size=o.get("patch_size", patch_size), merge_size=o.get("merge_size", 2),
               temporal_patch_size=o.get("temporal_patch_size", 2), image_mean=list(processor.mean), image_std=list(processor.std),
               resample=RESAMPLE[processor.resample])


def _qwen2_vl_video_settings(model) -> dict:
    """Qwen2VLVideoProcessor's settings for the model's video side (written as JSON: the class
    itself needs torchvision)."""
    p = model.config.processor
    o, video = p.options, dict(p.options.get("video") or {})
    settings = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": o.get("patch_size", 14),
                "merge_size": o.get("merge_size", 2), "temporal_patch_size": o.get("temporal_patch_size", 2),
                "size": {"shortest_edge": o.get("video_min_pixels") or o.get("min_pixels", 56 * 56),
                         "longest_edge": o.get("video_max_pixels") or o.get("max_pixels", 28 * 28 * 1280)},
                "image_mean": list(p.mean), "image_std": list(p.std), "do_rescale": True, "do_normalize": True,
                "resample": RESAMPLE[p.resample], "do_sample_frames": False}
    if video.get("sampling") == "fps":
        settings |= {"do_sample_frames": True, "fps": video.get("fps", 2.0), "min_frames": video.get("min_frames", 4),
                     "max_frames": video.get("max_frames", 768)}
    elif "num_frames" in video:
        settings |= {"do_sample_frames": True, "num_frames": video["num_frames"]}
    return settings


def _reference_inputs(model, prompt, ids):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if _is_qwen25(model) else Qwen2VLForConditionalGeneration
    return cls, mrope_reference_inputs(model, prompt, ids)


def mrope_reference_inputs(model, prompt, ids) -> dict:
    """The first image's pixels, its patch grid and the image-token mask, as the M-RoPE models'
    forward takes them."""
    return {"pixel_values": prompt.images[0].pixel_values, "image_grid_thw": torch.tensor([prompt.images[0].views[0].grid]),
            "mm_token_type_ids": (ids == model.image_token_id).int()}


def _is_qwen2_vl(model) -> bool:
    return isinstance(model.vision, Qwen2ViTTower)


def _model_type_of(model) -> str:
    return "qwen2_5_vl" if _is_qwen25(model) else "qwen2_vl"


QWEN2_VL = HFFamily(("qwen2_vl", "qwen2_5_vl"), "Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, "
                   "Qwen2_5_VLForConditionalGeneration)", import_qwen2_vl, export_qwen2_vl, _is_qwen2_vl, _reference_inputs,
                   specificity=2, model_type_of=_model_type_of)
