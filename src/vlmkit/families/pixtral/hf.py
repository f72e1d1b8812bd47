"""Pixtral (transformers' `LlavaForConditionalGeneration` with a Pixtral vision tower, e.g.
mistral-community/pixtral-12b) and Mistral3 (`Mistral3ForConditionalGeneration`, e.g.
Mistral-Small-3.1): import from and export to their Hugging Face folders.

* the tower is transformers' own `PixtralVisionModel` (`hf-random`, model_type `pixtral`, the
  folder's weights): vlmkit's `rope-vit` has Pixtral's shape but not its rotary layout (it turns
  interleaved pairs and gives rows and columns one frequency ladder; Pixtral rotates halves and
  gives columns the odd frequencies), so it cannot hold these weights with equal outputs;
* Pixtral's projector is LLaVA's 2-layer GELU MLP (`mlp`); Mistral3's is an RMSNorm, a 2x2 learned
  patch merge and the MLP (`patch-merger`);
* the LLM (Mistral, Llama ...) is a standalone causal-LM folder (`llm/`), as in the other families;
* preprocessing is vlmkit's `pixtral` family with the folder's longest edge, patch size, spatial
  merge, mean/std and resampling: one `[IMG]` per (merged) patch, `[IMG_BREAK]` after each row,
  `[IMG_END]` in place of the last. Several images per prompt work as in transformers.

A Pixtral folder's config says `model_type: llava`; this family accepts exactly the LLaVA folders
whose `vision_config.model_type` is `pixtral` (the LLaVA-1.5 importer keeps the others).
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
from vlmkit.hf.reference import llava_layout_state
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.mlp import MLPConnector
from vlmkit.model.connectors.patch_merger import PatchMergerConnector
from vlmkit.model.vision import HFVisionTower

_RESAMPLE_IDS = {"nearest": 0, "bilinear": 2, "bicubic": 3}
_BREAKS = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


def _is_pixtral_llava(cfg: dict) -> bool:
    return (cfg.get("vision_config") or {}).get("model_type") == "pixtral"


def _check_config(folder: Path, cfg, mistral3: bool) -> None:
    """Refuse what vlmkit cannot reproduce: another tower, several feature layers, a dropped first
    patch, a projector that is not exact GELU."""
    vision_cfg = cfg.vision_config
    if vision_cfg.model_type != "pixtral":
        raise ExportError(f"{folder}/config.json: vision tower {vision_cfg.model_type!r}; this family needs a Pixtral tower")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"{folder}/config.json: vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers "
                          "has no vlmkit equivalent")
    if not mistral3 and cfg.vision_feature_select_strategy != "full":
        raise ExportError(f"{folder}/config.json: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} would drop "
                          "the first patch of a Pixtral tower (it has no CLS token); vlmkit keeps every patch ('full')")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"{folder}/config.json: projector activation {cfg.projector_hidden_act!r}; vlmkit's projector uses exact GELU")


def _connector_state(folder: Path, projector: dict[str, torch.Tensor], mistral3: bool, bias: bool) -> dict[str, torch.Tensor]:
    """The folder's multi_modal_projector as the mlp / patch-merger connector's state."""
    p = projector
    names = {"fc1.weight": "linear_1.weight", "fc2.weight": "linear_2.weight"}
    if mistral3:
        names |= {"norm.weight": "norm.weight", "merging_layer.weight": "patch_merger.merging_layer.weight"}
    if bias:
        names |= {"fc1.bias": "linear_1.bias", "fc2.bias": "linear_2.bias"}
    absent = [v for v in names.values() if v not in p]
    if absent:
        raise ExportError(f"{folder}: multi_modal_projector tensors are missing: {absent}")
    connector_state = {ours: p[theirs] for ours, theirs in names.items()}
    if not mistral3 and not bias:  # a bias-free LLaVA projector is bias = 0
        connector_state |= {"fc1.bias": torch.zeros(p["linear_1.weight"].shape[0]), "fc2.bias": torch.zeros(p["linear_2.weight"].shape[0])}
    return connector_state


def _processor_geometry(folder: Path, settings: dict, vision_cfg, merge: int) -> tuple[int, int, str]:
    """(patch size, longest edge, image token) from the processor files, checked against the
    model's config and against the break tokens vlmkit's pixtral processor writes."""
    processor_cfg = read_json(folder / "processor_config.json")
    for key, default in _BREAKS.items():
        if processor_cfg.get(key, default) != default:
            raise ExportError(f"{folder}/processor_config.json: {key} {processor_cfg[key]!r}; vlmkit's pixtral family writes {default}")
    patch = int(processor_cfg.get("patch_size") or settings.get("patch_size") or vision_cfg.patch_size)
    if isinstance(settings.get("patch_size"), dict):
        patch = int(settings["patch_size"].get("height", patch))
    if patch != vision_cfg.patch_size:
        raise ExportError(f"{folder}: the processor's patch size {patch} differs from the vision tower's {vision_cfg.patch_size}")
    proc_merge = int(processor_cfg.get("spatial_merge_size", merge))
    if proc_merge != merge:
        raise ExportError(f"{folder}/processor_config.json: spatial_merge_size {proc_merge}, but config.json merges {merge}x{merge}")
    longest = int((settings.get("size") or {}).get("longest_edge") or vision_cfg.image_size)
    return patch, longest, processor_cfg.get("image_token", "[IMG]")


def _recipe(cfg, connector: dict, settings: dict, staged_llm: Path, *, patch: int, longest: int, merge: int,
            image_token: str) -> dict:
    """The vlmkit recipe of the imported model: the Pixtral tower, the connector, the staged LLM
    and the pixtral processor with the folder's settings."""
    vision_cfg = cfg.vision_config
    return {"model": {
        "vision": {"name": "hf-random", "model_type": "pixtral", "config": hf_config_dict(vision_cfg),
                   "feature_layer": cfg.vision_feature_layer},
        "connector": connector,
        "llm": {"name": "hf", "path": str(staged_llm)},
        "processor": {"name": "pixtral", "image_size": longest,
                      "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                      "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                      "resample": resample_name(settings),
                      "options": {"longest_edge": longest, "patch_size": patch, "spatial_merge": merge, "sentinels": "never"}},
        "image_token": image_token,
    }}


def _import(folder: Path, out: Path, mistral3: bool) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    _check_config(folder, cfg, mistral3)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    merge = int(cfg.spatial_merge_size) if mistral3 else 1

    state = read_weights(folder)
    parts = split_state(state, {"vision_tower.": "vision", "model.vision_tower.": "vision",
                                "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
                                "language_model.model.": "llm", "model.language_model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    bias = bool(getattr(cfg, "multimodal_projector_bias", True))
    connector_state = _connector_state(folder, parts["projector"], mistral3, bias)
    llm_state = causal_lm_state(parts)

    settings = image_processor_settings(folder)
    patch, longest, image_token = _processor_geometry(folder, settings, vision_cfg, merge)
    tokenizer = folder_tokenizer(folder, image_token)
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = cfg.image_token_index

    width = parts["projector"]["linear_1.weight"].shape[0]
    if mistral3:
        connector = {"name": "patch-merger", "options": {"merge": merge, "norm_eps": float(text_cfg.rms_norm_eps),
                                                         "hidden_size": width, "bias": bias}}
    else:
        connector = {"name": "mlp", "options": {"hidden_size": width}}
    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config(_recipe(cfg, connector, settings, staged_llm, patch=patch, longest=longest, merge=merge,
                                     image_token=image_token))
        model = build_imported(config, image_token, image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "vision_tower.")
        load_part(model.connector, connector_state, "projector", "multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 4096))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_pixtral(folder: Path, out: Path) -> Path:
    return _import(folder, out, mistral3=False)


def import_mistral3(folder: Path, out: Path) -> Path:
    return _import(folder, out, mistral3=True)


# ---- export ----------------------------------------------------------------------------------


def _pixtral_tower(model) -> bool:
    return isinstance(model.vision, HFVisionTower) and model.vision.model.config.model_type == "pixtral"


def _owns_pixtral(model) -> bool:
    return (model.config.processor.name == "pixtral" and model.config.fusion == "prefix" and _pixtral_tower(model)
            and isinstance(model.connector, MLPConnector))


def _owns_mistral3(model) -> bool:
    return (model.config.processor.name == "pixtral" and model.config.fusion == "prefix" and _pixtral_tower(model)
            and isinstance(model.connector, PatchMergerConnector))


@torch.no_grad()
def _export(model, out: Path, mistral3: bool) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    if not (_owns_mistral3(model) if mistral3 else _owns_pixtral(model)):
        raise ExportError(f"{'Mistral3' if mistral3 else 'Pixtral'} needs the pixtral processor, prefix fusion, a Pixtral tower "
                          f"(hf-random, model_type pixtral) and the {'patch-merger' if mistral3 else 'mlp'} connector")
    tower, conn, tok = model.vision, model.connector, model.tokenizer
    p = model.config.processor
    o = dict(p.options)
    merge = int(o.get("spatial_merge", 1))
    text = hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    common = {"vision_config": hf_config_dict(tower.model.config) | {"model_type": "pixtral"}, "text_config": text, "image_token_index": model.image_token_id,
              "vision_feature_layer": tower.feature_layer, "projector_hidden_act": "gelu", "tie_word_embeddings": tied}
    cstate = conn.state_dict()
    if mistral3:
        if conn.options.merge != merge:
            raise ExportError(f"the connector merges {conn.options.merge}x{conn.options.merge} patches but the processor's "
                              f"spatial_merge is {merge}")
        if abs(conn.options.norm_eps - float(getattr(model.llm.config, "rms_norm_eps", conn.options.norm_eps))) > 0:
            raise ExportError(f"Mistral3's projector norm uses the text config's rms_norm_eps; the connector's norm_eps "
                              f"{conn.options.norm_eps} differs from it ({model.llm.config.rms_norm_eps})")
        if conn.fc1.out_features != model.llm.config.hidden_size:
            raise ExportError("Mistral3's projector hidden width is the LLM width")
        ref = Mistral3ForConditionalGeneration(Mistral3Config(**common, spatial_merge_size=merge,
                                                              multimodal_projector_bias=conn.options.bias)).eval()
        names = {"norm.weight": "norm.weight", "merging_layer.weight": "patch_merger.merging_layer.weight",
                 "fc1.weight": "linear_1.weight", "fc2.weight": "linear_2.weight"}
        if conn.options.bias:
            names |= {"fc1.bias": "linear_1.bias", "fc2.bias": "linear_2.bias"}
    else:
        if merge != 1:
            raise ExportError(f"Pixtral (LLaVA) has no spatial merge; the processor's spatial_merge is {merge}")
        if conn.fc1.out_features != model.llm.config.hidden_size or not isinstance(conn.norm, torch.nn.Identity):
            raise ExportError("LLaVA's projector is the plain 2-layer GELU MLP at the LLM width (mlp, no input_norm)")
        ref = LlavaForConditionalGeneration(LlavaConfig(**common, vision_feature_select_strategy="full",
                                                        multimodal_projector_bias=True)).eval()
        names = {"fc1.weight": "linear_1.weight", "fc1.bias": "linear_1.bias", "fc2.weight": "linear_2.weight", "fc2.bias": "linear_2.bias"}
    state = llava_layout_state(model, {theirs: cstate[ours] for ours, theirs in names.items()})
    load_reference(ref, state, "Mistral3" if mistral3 else "Pixtral (LLaVA)")
    if tied:
        ref.tie_weights()
    ref.generation_config = hf_generation_config(tok)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": int(o.get("longest_edge", p.image_size))},
                                               patch_size=int(o.get("patch_size", 16)), image_mean=list(p.mean),
                                               image_std=list(p.std), resample=_RESAMPLE_IDS[p.resample])

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps({
            "processor_class": "PixtralProcessor", "patch_size": int(o.get("patch_size", 16)), "spatial_merge_size": merge,
            "image_token": model.config.image_token, **_BREAKS}, indent=2))

    return atomic_folder(Path(out), write)


def export_pixtral(model, out: Path) -> Path:
    return _export(model, out, mistral3=False)


def export_mistral3(model, out: Path) -> Path:
    return _export(model, out, mistral3=True)


def _reference(cls_name: str):
    def reference(model, prompt, ids):
        import transformers

        images = prompt.images
        pixels = [im.pixel_values[0] for im in images]
        h, w = max(x.shape[-2] for x in pixels), max(x.shape[-1] for x in pixels)
        batch = torch.zeros(len(pixels), 3, h, w)
        for i, x in enumerate(pixels):  # transformers pads every image to the largest, bottom-right
            batch[i, :, : x.shape[-2], : x.shape[-1]] = x
        sizes = torch.tensor([list(x.shape[-2:]) for x in pixels])
        return getattr(transformers, cls_name), {"pixel_values": batch, "image_sizes": sizes}

    return reference


PIXTRAL = HFFamily(("llava",), "Pixtral (LlavaForConditionalGeneration with a Pixtral vision tower)", import_pixtral,
                   export_pixtral, _owns_pixtral, _reference("LlavaForConditionalGeneration"), accepts=_is_pixtral_llava, specificity=5)
MISTRAL3 = HFFamily(("mistral3",), "Mistral3 / Mistral-Small-3.1 (Mistral3ForConditionalGeneration)", import_mistral3,
                    export_mistral3, _owns_mistral3, _reference("Mistral3ForConditionalGeneration"), specificity=5)
