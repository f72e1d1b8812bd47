"""Llama 3.2 Vision (`mllama`, transformers' `MllamaForConditionalGeneration`): import from and
export to its Hugging Face folders.

* the tower is transformers' `MllamaVisionModel` (`mllama-vit`): it encodes all tile slots of an
  image together, with the aspect-ratio id's tile embeddings, so the `mllama` processor hands it
  every slot (`options.pad_tiles: true`; the empty slots past the image's tiles are never read);
* the projector is one linear layer (`linear`, with bias) into the LLM width;
* the LLM is `MllamaForCausalLM` (`mllama-text`): Llama with gated cross-attention decoder layers,
  written as `llm/`; vlmkit's cross-attention fusion drives those layers
  (`connector.options.cross_attention.layers: llm`) with the per-token, per-tile mask transformers'
  processor builds (`cross_attention_mask`);
* preprocessing is vlmkit's `mllama` family with the folder's tile size, max tiles, mean/std and
  resampling; each image is one `<|image|>` token of the LLM's vocabulary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.mllama.model import MllamaViTTower, causal_lm_class, image_ranges
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    causal_lm_state,
    hf_config_dict,
    image_processor_settings,
    load_part,
    max_positions,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, write_checkpoint
from vlmkit.model.connectors.mlp import LinearConnector

IMAGE_TOKEN = "<|image|>"
_RESAMPLE_IDS = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def import_mllama(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    state = read_weights(folder)
    parts = split_state(state, {"vision_model.": "vision", "model.vision_model.": "vision",
                                "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
                                "language_model.model.": "llm", "model.language_model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    p = parts["projector"]
    if "weight" not in p or "bias" not in p:
        raise ExportError(f"{folder}: multi_modal_projector.weight / .bias are missing")
    llm_state = causal_lm_state(parts)

    settings = image_processor_settings(folder)
    size = settings.get("size") or {}
    tile = int(size.get("height") or vision_cfg.image_size)
    if tile != vision_cfg.image_size or int(size.get("width", tile)) != tile:
        raise ExportError(f"{folder}: the image processor's tile {size} differs from the vision tower's image_size {vision_cfg.image_size}")
    max_tiles = int(settings.get("max_image_tiles", vision_cfg.max_num_tiles))
    if max_tiles != vision_cfg.max_num_tiles:
        raise ExportError(f"{folder}: the image processor's max_image_tiles {max_tiles} differs from the vision tower's "
                          f"max_num_tiles {vision_cfg.max_num_tiles}")
    tokenizer = folder_tokenizer(folder, IMAGE_TOKEN)

    tmp = staging_folder(out)
    try:
        staged_llm = tmp / "llm"
        tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
        text_cfg.tie_word_embeddings = tied
        if tied:
            llm_state.pop("lm_head.weight", None)
        causal = causal_lm_class()(text_cfg).eval()
        load_part(causal, llm_state, "language model", "language_model.",
                  optional=("rotary", "inv_freq") + (("lm_head.weight",) if tied else ()))
        if tied:
            causal.tie_weights()
        causal.save_pretrained(staged_llm, safe_serialization=True)
        tokenizer.save_pretrained(staged_llm)
        del causal
        config = load_config({"model": {
            "vision": {"name": "mllama-vit", "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "linear", "options": {"bias": True, "cross_attention": {"layers": "llm"}}},
            "llm": {"name": "mllama-text", "path": str(staged_llm)},
            "fusion": "cross-attention",
            "processor": {"name": "mllama", "image_size": tile, "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                          "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                          "resample": resample_name(dict(settings, resample=settings.get("resample", 2))),
                          "options": {"patch_size": vision_cfg.patch_size, "max_tiles": max_tiles, "pad_tiles": True,
                                      "sentinels": "never"}},
            "image_token": IMAGE_TOKEN,
        }})
        model = build_imported(config, IMAGE_TOKEN, cfg.image_token_index)
        load_part(model.vision.model, parts["vision"], "vision tower", "vision_model.")
        load_part(model.connector, {"proj.weight": p["weight"], "proj.bias": p["bias"]}, "projector", "multi_modal_projector.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 4096, cap=131072))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owns_mllama(model) -> bool:
    return model.config.fusion == "cross-attention" and isinstance(model.vision, MllamaViTTower)


@torch.no_grad()
def export_mllama(model, out: Path) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tower, conn, tok = model.vision, model.connector, model.tokenizer
    if not _owns_mllama(model) or not isinstance(conn, LinearConnector) or conn.proj.bias is None \
            or model.llm.config.model_type != "mllama_text_model":
        raise ExportError("Llama 3.2 Vision needs the mllama-vit tower, a linear connector with bias, the mllama-text LLM "
                          "and cross-attention fusion with layers: llm")
    text = hf_config_dict(model.llm.config)
    vision = hf_config_dict(tower.model.config)
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    ref = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text, image_token_index=model.image_token_id,
                                                      tie_word_embeddings=tied)).eval()
    state = {f"model.vision_model.{k}": v for k, v in tower.model.state_dict().items()}
    state |= {"model.multi_modal_projector.weight": conn.proj.weight, "model.multi_modal_projector.bias": conn.proj.bias}
    state |= {f"model.language_model.{k}": v for k, v in model.llm.model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "Llama 3.2 Vision")
    ref.generation_config = hf_generation_config(tok)
    p, proc = model.config.processor, model.image_processor
    image_processor = MllamaImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, max_image_tiles=proc.max_tiles,
                                              image_mean=list(p.mean), image_std=list(p.std), resample=_RESAMPLE_IDS[p.resample])
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=plain_template(tok))

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return atomic_folder(Path(out), write)


def reference_inputs(model, images: list, ids: torch.Tensor) -> dict:
    """transformers' inputs for a prompt's images: every tile slot, aspect-ratio ids and masks,
    and the (1, L, images, max_tiles) cross_attention_mask its processor builds."""
    markers = [j for j, t in enumerate(ids[0].tolist()) if t == model.image_token_id]
    max_tiles = images[0].pixel_values.shape[0]
    mask = torch.zeros(1, ids.shape[1], len(images), max_tiles, dtype=torch.long)
    for j, ((start, end), im) in enumerate(zip(image_ranges(markers, ids.shape[1]), images)):
        mask[0, start:end, j, : im.extra["num_tiles"]] = 1
    return {"pixel_values": torch.stack([im.pixel_values for im in images])[None],
            "aspect_ratio_ids": torch.tensor([[im.extra["aspect_ratio_id"] for im in images]]),
            "aspect_ratio_mask": torch.stack([im.extra["aspect_ratio_mask"] for im in images])[None],
            "cross_attention_mask": mask}


def _reference(model, prompt, ids):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration, reference_inputs(model, prompt.images, ids)


MLLAMA = HFFamily(("mllama",), "Llama 3.2 Vision (MllamaForConditionalGeneration)", import_mllama, export_mllama,
                  _owns_mllama, _reference, specificity=6)
