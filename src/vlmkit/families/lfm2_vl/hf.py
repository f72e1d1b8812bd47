"""LFM2-VL folders (`lfm2_vl`, `Lfm2VlForConditionalGeneration`) <-> vlmkit checkpoints.

* the SigLIP2 NaFlex tower as the family's `siglip2-naflex` tower (its last, post-layernormed
  output, as transformers reads it);
* `multi_modal_projector` (pixel unshuffle, LayerNorm when `projector_use_layernorm`, Linear, the
  `projector_hidden_act` GELU, Linear) as the core `pixel-shuffle` connector: `layer_norm` ->
  `norm`, `linear_1` / `linear_2` -> `proj.0` / `proj.2`;
* the LFM2 decoder (short-conv and attention layers, its own cache) as the `hf` LLM, transformers'
  `Lfm2ForCausalLM`;
* `Lfm2VlImageProcessor`'s settings (preprocessor_config.json) as the `lfm2_vl` processor.

transformers' image processor needs torchvision, so export writes its preprocessor_config.json
and processor_config.json as that processor saves them, without building it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.lfm2_vl.model import TOWER, NaFlexTower
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
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import chat_template, plain_template, template_source, usable_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector

IMAGE_TOKEN = "<image>"
TOWERS = ("siglip2_vision_model",)
# theirs (multi_modal_projector.*) -> ours (the pixel-shuffle connector)
PROJECTOR = {"layer_norm": "norm", "linear_1": "proj.0", "linear_2": "proj.2"}
RESAMPLE_IDS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _check_config(folder: Path, cfg) -> None:
    if cfg.vision_config.model_type not in TOWERS:
        raise ExportError(f"{folder}: vision tower {cfg.vision_config.model_type!r}; vlmkit imports LFM2-VL with {TOWERS}")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"{folder}: projector_hidden_act={cfg.projector_hidden_act!r}; vlmkit's projector uses 'gelu'")


def _projector_state(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in theirs.items():
        module, _, leaf = key.partition(".")
        if module not in PROJECTOR:
            raise ExportError(f"projector: unexpected tensor model.multi_modal_projector.{key}")
        out[f"{PROJECTOR[module]}.{leaf}"] = value
    return out


def _processor_config(folder: Path, cfg) -> dict:
    s = image_processor_settings(folder)
    patch = int(s.get("encoder_patch_size", 16))
    if patch != cfg.vision_config.patch_size:
        raise ExportError(f"{folder}: the image processor's encoder_patch_size {patch} differs from the tower's patch_size "
                          f"{cfg.vision_config.patch_size}")
    if int(s.get("downsample_factor", 2)) != cfg.downsample_factor:
        raise ExportError(f"{folder}: the image processor's downsample_factor {s.get('downsample_factor')} differs from "
                          f"config.json's {cfg.downsample_factor}")
    return {"name": "lfm2_vl", "image_size": int(s.get("tile_size", 512)), "mean": list(s.get("image_mean", (0.5,) * 3)),
            "std": list(s.get("image_std", (0.5,) * 3)), "resample": resample_name({"resample": s.get("resample", 2)}),
            "options": {"patch_size": patch, "downsample": cfg.downsample_factor,
                        "min_image_tokens": int(s.get("min_image_tokens", 64)), "max_image_tokens": int(s.get("max_image_tokens", 256)),
                        "min_tiles": int(s.get("min_tiles", 2)), "max_tiles": int(s.get("max_tiles", 10)),
                        "use_thumbnail": bool(s.get("use_thumbnail", True)), "split": bool(s.get("do_image_splitting", True)),
                        "max_pixels_tolerance": float(s.get("max_pixels_tolerance", 2.0)),
                        # Lfm2VlProcessor writes no `<image_k>` tag before each image of a multi-image prompt.
                        "sentinels": "never"}}


def _import_lfm2_vl(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    _check_config(folder, cfg)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    parts = split_state(read_weights(folder), {"model.vision_tower.": "vision", "model.multi_modal_projector.": "projector",
                                               "model.language_model.": "llm", "lm_head.": "head"})
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, IMAGE_TOKEN, str(folder / "tokenizer.json"))
    template = chat_template(folder, tokenizer)
    if not template:
        raise ExportError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
    tokenizer.chat_template = usable_template(template, tokenizer, IMAGE_TOKEN, template_source(folder))
    processor = _processor_config(folder, cfg)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": TOWER, "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "pixel-shuffle", "options": {
                "ratio": 1 / cfg.downsample_factor, "norm": "post" if cfg.projector_use_layernorm else "none", "norm_eps": 1e-5,
                "projector": "mlp", "hidden_size": cfg.projector_hidden_size, "bias": cfg.projector_bias}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": processor,
            "image_token": IMAGE_TOKEN,
        }})
        model = build_imported(config, IMAGE_TOKEN, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_tower.")
        load_part(model.connector, _projector_state(parts["projector"]), "projector", "model.multi_modal_projector.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 4096, cap=32768))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owns(model) -> bool:
    conn = model.connector
    return (model.config.processor.name == "lfm2_vl" and model.config.fusion == "prefix" and isinstance(model.vision, NaFlexTower)
            and isinstance(conn, PixelShuffleConnector) and conn.options.norm in ("post", "none")
            and conn.options.projector == "mlp")


@torch.no_grad()
def _reference_model(model):
    """transformers' Lfm2VlForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    if not _owns(model):
        raise ExportError("LFM2-VL needs the lfm2_vl processor, prefix fusion, the siglip2-naflex tower and the pixel-shuffle "
                          "connector with an mlp projector (norm post or none)")
    conn, tower, llm_cfg = model.connector, model.vision, model.llm.config
    if tower.feature_layer != -1:
        raise ExportError("LFM2-VL reads the tower's last output (feature_layer -1)")
    if conn.options.norm == "post" and abs(conn.norm.eps - 1e-5) > 0:
        raise ExportError(f"LFM2-VL's projector LayerNorm has eps 1e-5; the connector's is {conn.norm.eps}")
    tied = bool(getattr(llm_cfg, "tie_word_embeddings", False))
    config = Lfm2VlConfig(vision_config=hf_config_dict(tower.model.config) | {"model_type": "siglip2_vision_model"},
                          text_config=hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type},
                          image_token_id=model.image_token_id, projector_hidden_act="gelu",
                          projector_hidden_size=conn.proj[0].out_features, projector_bias=conn.options.bias,
                          projector_use_layernorm=conn.options.norm == "post", downsample_factor=conn.factor,
                          tie_word_embeddings=tied)
    ref = Lfm2VlForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    ours_to_theirs = {v: k for k, v in PROJECTOR.items()}
    for key, value in conn.state_dict().items():
        module, _, leaf = key.rpartition(".")
        state[f"model.multi_modal_projector.{ours_to_theirs[module]}.{leaf}"] = value
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "LFM2-VL")
    if tied:
        ref.tie_weights()
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


def _image_processor_json(model) -> dict:
    p, proc = model.config.processor, model.image_processor
    return {"image_processor_type": "Lfm2VlImageProcessor", "processor_class": "Lfm2VlProcessor",
            "downsample_factor": proc.downsample, "encoder_patch_size": proc.patch_size, "tile_size": proc.tile_size,
            "do_image_splitting": proc.max_tiles > 1, "min_tiles": int(p.options.get("min_tiles", 2)),
            "max_tiles": int(p.options.get("max_tiles", 10)), "use_thumbnail": proc.use_thumbnail,
            "min_image_tokens": proc.min_pixels // proc.unit**2, "max_image_tokens": proc.max_image_tokens,
            "max_pixels_tolerance": proc.max_pixels_tolerance, "do_resize": True, "resample": RESAMPLE_IDS[p.resample],
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean),
            "image_std": list(p.std), "do_pad": True, "size": {"height": proc.tile_size, "width": proc.tile_size}}


def _export_lfm2_vl(model, out: Path) -> Path:
    ref = _reference_model(model)
    tok = model.tokenizer
    settings = _image_processor_json(model)

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps({"processor_class": "Lfm2VlProcessor"}, indent=2))

    return atomic_folder(Path(out), write)


def naflex_inputs(model, images) -> dict:
    """transformers' keyword inputs for these processed images: every view's patches padded to the
    most any view has, its (h, w) patch grid and the mask over the padding."""
    views = [(view, pixels) for im in images for view, pixels in zip(im.views, im.view_pixels())]
    flat = [model.vision.patches(pixels[None])[0] for _, pixels in views]
    longest = max(f.shape[0] for f in flat)
    values = torch.zeros(len(flat), longest, flat[0].shape[-1])
    mask = torch.zeros(len(flat), longest, dtype=torch.int32)
    for i, f in enumerate(flat):
        values[i, : f.shape[0]], mask[i, : f.shape[0]] = f, 1
    shapes = torch.tensor([model.vision.grid_hw(*view.size) for view, _ in views])
    return {"pixel_values": values, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def _reference(model, prompt, ids):
    from transformers import Lfm2VlForConditionalGeneration

    return Lfm2VlForConditionalGeneration, naflex_inputs(model, prompt.images)


LFM2_VL = HFFamily(("lfm2_vl",), "LFM2-VL (Lfm2VlForConditionalGeneration)", _import_lfm2_vl, _export_lfm2_vl, processor_is("lfm2_vl"),
                   _reference, specificity=5)
