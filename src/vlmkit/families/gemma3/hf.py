"""Gemma 3 (`gemma3`, Gemma3ForConditionalGeneration).

* vision: its SigLIP tower (`hf-random` siglip_vision_model + the folder's weights, last layer);
* connector: Gemma3MultiModalProjector as `pooling`: k x k average pooling down to
  `mm_tokens_per_image` tokens, Gemma's RMSNorm (x / rms * (1 + w), `pooled_norm:
  gemma-rmsnorm`) and one bias-free linear layer (the transpose of `mm_input_projection_weight`);
* LLM: the Gemma 3 text decoder (`hf`, Gemma3ForCausalLM);
* attention: `model.attention: image`: each image's tokens attend to each other, the rest is
  causal (sliding-window layers keep their window, as in transformers);
* preprocessing: `fixed` with `fit: squash` and the folder's size, resample, mean and std; each
  image becomes "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n" (Gemma3Processor's
  `full_image_sequence`). Pan-and-scan crops are not supported: a folder that turns them on is
  refused.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.paligemma.hf import gemma_text_llm, llm_state, siglip_tower_dict, text_dict
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
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
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import build_imported, hf_generation_config, load_reference, save_with_processor, write_checkpoint
from vlmkit.model.connectors.pooling import GemmaRMSNorm, PoolingConnector
from vlmkit.model.vision import HFVisionTower

_RESAMPLE_IDS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def import_gemma3(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if vision_cfg.model_type != "siglip_vision_model":
        raise ExportError(f"{folder}: vision tower {vision_cfg.model_type!r}; Gemma 3 import supports its SigLIP tower")
    patches = vision_cfg.image_size // vision_cfg.patch_size
    side = int(round(cfg.mm_tokens_per_image**0.5))
    if side * side != cfg.mm_tokens_per_image or patches % side:
        raise ExportError(f"{folder}: mm_tokens_per_image={cfg.mm_tokens_per_image} is not a square that pools the tower's "
                          f"{patches}x{patches} patch grid")
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_tower.": "vision", "vision_tower.": "vision",
                                "model.multi_modal_projector.": "projector", "multi_modal_projector.": "projector",
                                "model.language_model.": "llm", "language_model.model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith("head.")}  # the pooling head is unused
    p = parts["projector"]
    absent = [k for k in ("mm_input_projection_weight", "mm_soft_emb_norm.weight") if k not in p]
    if absent:
        raise ExportError(f"{folder}: multi_modal_projector tensors are missing: {absent}")
    connector_state = {"proj.weight": p["mm_input_projection_weight"].t().contiguous(),
                       "pooled_norm.weight": p["mm_soft_emb_norm.weight"]}
    llm_state_ = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    settings = image_processor_settings(folder)
    if settings.get("do_pan_and_scan"):
        raise ExportError(f"{folder}: the image processor turns pan-and-scan on; vlmkit's Gemma 3 import supports it off")
    size = (settings.get("size") or {}).get("height") or vision_cfg.image_size
    if size != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's size {size} differs from the vision tower's image_size {vision_cfg.image_size}")
    probe = load_tokenizer(folder)
    image_token = probe.convert_ids_to_tokens(cfg.image_token_id)
    boi, eoi = probe.convert_ids_to_tokens(cfg.boi_token_id), probe.convert_ids_to_tokens(cfg.eoi_token_id)
    tokenizer = folder_tokenizer(folder, image_token)

    tmp = staging_folder(out)
    try:
        staged_llm = tmp / "llm"
        gemma_text_llm(text_cfg, llm_state_, cfg, staged_llm, tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": "siglip_vision_model", "config": siglip_tower_dict(vision_cfg)},
            "connector": {"name": "pooling", "options": {"kernel": patches // side, "projector": "linear", "bias": False,
                                                         "pooled_norm": "gemma-rmsnorm", "norm_eps": vision_cfg.layer_norm_eps}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "fixed", "image_size": size, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings | {"resample": settings.get("resample", 2)}),
                          "options": {"fit": "squash", "sentinels": "never", "before": f"\n\n{boi}", "after": f"{eoi}\n\n"}},
            "image_token": image_token,
            "attention": "image",
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, vision_state, "vision tower", "model.vision_tower.")
        load_part(model.connector, connector_state, "projector", "model.multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_named_tokens(tok, named: dict):
    """`tok` reloaded with named special tokens (`extra_special_tokens` as a name -> token map)."""
    import json
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        path = Path(d) / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        cfg["extra_special_tokens"] = named
        path.write_text(json.dumps(cfg))
        return AutoTokenizer.from_pretrained(d, local_files_only=True)


def _is_gemma3(model) -> bool:
    return (model.config.attention == "image" and isinstance(model.connector, PoolingConnector)
            and isinstance(model.connector.pooled_norm, GemmaRMSNorm))


@torch.no_grad()
def export_gemma3(model, out: str | Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tower, conn = model.vision, model.connector
    o = model.config.processor.options
    before, after = o.get("before", ""), o.get("after", "")
    if (not isinstance(tower, HFVisionTower) or tower.model.config.model_type != "siglip_vision_model" or tower.feature_layer != -1
            or o.get("fit") != "squash" or conn.options.projector != "linear" or conn.options.bias
            or model.llm.config.model_type != "gemma3_text" or not before.startswith("\n\n") or not after.endswith("\n\n")):
        raise ExportError("Gemma 3 needs a SigLIP tower (last layer), a pooling connector with a Gemma RMSNorm and one bias-free "
                          "linear layer, a squash-resizing fixed processor with the start/end-of-image text, and a Gemma 3 LLM")
    tok = copy.deepcopy(model.tokenizer)
    boi, eoi = before[2:], after[:-2]
    p = model.config.processor
    grid = tower.grid(p.image_size)
    tokens = conn.num_tokens(grid)
    vision = hf_config_dict(tower.model.config) | {"vision_use_head": False}
    vocab = tok.get_vocab()
    config = Gemma3Config(vision_config=vision, text_config=text_dict(model), mm_tokens_per_image=tokens,
                          boi_token_index=vocab[boi], eoi_token_index=vocab[eoi], image_token_index=model.image_token_id,
                          tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", True)))
    ref = Gemma3ForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items() if "position_ids" not in k}
    state["model.multi_modal_projector.mm_input_projection_weight"] = conn.proj.weight.t().contiguous()
    state["model.multi_modal_projector.mm_soft_emb_norm.weight"] = conn.pooled_norm.weight
    state |= llm_state(model, "model.language_model.")
    load_reference(ref, state, "Gemma3")
    ref.generation_config = hf_generation_config(tok)
    image_processor = Gemma3ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, image_mean=list(p.mean),
                                              image_std=list(p.std), resample=_RESAMPLE_IDS[p.resample])
    # Gemma3Processor reads the tokenizer's named special tokens (tokenizer.boi_token ...).
    named = {"boi_token": boi, "eoi_token": eoi, "image_token": model.config.image_token}
    if any(getattr(tok, k, None) != v for k, v in named.items()):
        tok = with_named_tokens(tok, named)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens,
                                chat_template=plain_template(tok))
    return save_with_processor(ref, processor, out)


def _gemma3_reference(model, prompt, ids):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images]),
                                            "token_type_ids": (ids == model.image_token_id).long()}


GEMMA3 = HFFamily(("gemma3",), "Gemma 3 (Gemma3ForConditionalGeneration)", import_gemma3, export_gemma3, _is_gemma3,
                  _gemma3_reference, specificity=8)
