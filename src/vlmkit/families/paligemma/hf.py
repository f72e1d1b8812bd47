"""PaliGemma (`paligemma`, PaliGemmaForConditionalGeneration; PaliGemma 2 with a Gemma 2 LLM).

* vision: its SigLIP tower (`hf-random` siglip_vision_model + the folder's weights, last layer);
* connector: one linear layer with bias (`linear`); Gemma's embedding scale lives in the LLM's
  embedding module, so image tokens enter unscaled, as in transformers;
* LLM: the Gemma / Gemma 2 causal LM (`hf`);
* attention: prefix-LM (`model.attention: prefix`): the images and the prompt attend to each
  other in both directions, the answer causally;
* preprocessing: `fixed` with `fit: squash` (SigLIP's processor: resize to the square, no
  padding), the folder's size, resample, mean and std;
* prompt: as PaliGemmaProcessor builds it, `<image>` x N (per image) + bos + prompt + "\\n"; the
  answer follows and ends with eos (the chat template below, unless the folder has its own).
"""

from __future__ import annotations

import copy
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
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import folder_tokenizer, plain_template
from vlmkit.hf.writing import build_imported, hf_generation_config, load_reference, save_with_processor, write_checkpoint
from vlmkit.model.connectors.mlp import LinearConnector
from vlmkit.model.vision import HFVisionTower

# PaliGemmaProcessor's layout as a chat template: the images, bos, the prompt and a newline; the
# answer and eos. (Released PaliGemma folders have no chat template.) A content list reads as its
# parts joined, images as `<image>`, so [image, text] puts the text right after bos, as the processor does.
PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set c = message['content'] -%}"
    "{%- if c is not string -%}{%- set _p = namespace(t='') -%}{%- for part in c -%}"
    "{%- if part['type'] == 'image' -%}{%- set _p.t = _p.t + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _p.t = _p.t + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set c = _p.t -%}{%- endif -%}"
    "{%- set e = c.rfind('<image>') -%}"
    "{%- if e >= 0 -%}{{ c[:e + 7] }}{{ bos_token }}{{ c[e + 7:] }}{%- else -%}{{ bos_token }}{{ c }}{%- endif -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_STRINGS_ONLY_TEMPLATE = PALIGEMMA_TEMPLATE.replace(PALIGEMMA_TEMPLATE[PALIGEMMA_TEMPLATE.index("{%- if c is not string"):
                                                                   PALIGEMMA_TEMPLATE.index("{%- set e = ")], "")

_RESAMPLE_IDS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def siglip_tower_dict(vision_cfg) -> dict:
    return hf_config_dict(vision_cfg) | {"vision_use_head": False}


def gemma_text_llm(text_cfg, llm_state: dict, outer, staged: Path, tokenizer) -> None:
    """The folder's Gemma decoder as a standalone causal LM folder; the VLM's attention rule, not
    the decoder's config, makes the prompt bidirectional."""
    if getattr(text_cfg, "use_bidirectional_attention", None):
        text_cfg.use_bidirectional_attention = False
    causal = causal_lm_from_state(text_cfg, llm_state, outer)
    causal.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)


def import_paligemma(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if vision_cfg.model_type != "siglip_vision_model":
        raise ExportError(f"{folder}: vision tower {vision_cfg.model_type!r}; PaliGemma import supports its SigLIP tower")
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_tower.": "vision", "vision_tower.": "vision",
                                "model.multi_modal_projector.": "projector", "multi_modal_projector.": "projector",
                                "model.language_model.": "llm", "language_model.model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    # PaliGemma reads the tower's last hidden state: a pooling head, if the folder has one, is unused.
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith("head.")}
    p = parts["projector"]
    if "linear.weight" not in p:
        raise ExportError(f"{folder}: multi_modal_projector.linear.weight is missing")
    connector_state = {"proj.weight": p["linear.weight"], "proj.bias": p.get("linear.bias", torch.zeros(p["linear.weight"].shape[0]))}
    llm_state = causal_lm_state(parts)
    settings = image_processor_settings(folder)
    size = (settings.get("size") or {}).get("height") or vision_cfg.image_size
    if size != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's size {size} differs from the vision tower's image_size {vision_cfg.image_size}")
    tokens = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    seq = settings.get("image_seq_length") or read_json(folder / "processor_config.json").get("image_seq_length") or tokens
    if seq != tokens:
        raise ExportError(f"{folder}: image_seq_length {seq} differs from the tower's {tokens} patches")
    image_token = "<image>"
    tokenizer = folder_tokenizer(folder, image_token)
    if not tokenizer.chat_template:
        tokenizer.chat_template = PALIGEMMA_TEMPLATE

    tmp = staging_folder(out)
    try:
        staged_llm = tmp / "llm"
        gemma_text_llm(text_cfg, llm_state, cfg, staged_llm, tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": "siglip_vision_model", "config": siglip_tower_dict(vision_cfg)},
            "connector": {"name": "linear", "options": {"bias": True}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "fixed", "image_size": size, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name(settings),
                          "options": {"fit": "squash", "sentinels": "never"}},
            "image_token": image_token,
            "attention": "prefix",
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, vision_state, "vision tower", "model.vision_tower.")
        load_part(model.connector, connector_state, "projector", "model.multi_modal_projector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_paligemma(model) -> bool:
    return (model.config.attention == "prefix" and model.config.processor.name == "fixed"
            and isinstance(model.connector, LinearConnector))


def text_dict(model) -> dict:
    d = hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    d.pop("use_bidirectional_attention", None)
    return d


def llm_state(model, prefix: str) -> dict:
    state = {f"{prefix}{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    return state


@torch.no_grad()
def export_paligemma(model, out: str | Path) -> Path:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tower, conn = model.vision, model.connector
    if (not isinstance(tower, HFVisionTower) or tower.model.config.model_type != "siglip_vision_model" or tower.feature_layer != -1
            or model.config.processor.options.get("fit") != "squash" or model.llm.config.model_type not in ("gemma", "gemma2")):
        raise ExportError("PaliGemma needs a SigLIP tower (last layer), a linear connector, a squash-resizing fixed processor "
                          "and a Gemma / Gemma 2 LLM")
    tok = model.tokenizer
    vision = hf_config_dict(tower.model.config) | {"vision_use_head": False}
    llm_dim = model.llm.get_input_embeddings().embedding_dim
    config = PaliGemmaConfig(vision_config=vision, text_config=text_dict(model), image_token_index=model.image_token_id,
                             projection_dim=llm_dim, hidden_size=llm_dim, vocab_size=model.llm.config.vocab_size,
                             tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", True)))
    ref = PaliGemmaForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items() if "position_ids" not in k}
    state["model.multi_modal_projector.linear.weight"] = conn.proj.weight
    state["model.multi_modal_projector.linear.bias"] = conn.proj.bias if conn.proj.bias is not None else torch.zeros(llm_dim)
    state |= llm_state(model, "model.language_model.")
    load_reference(ref, state, "PaliGemma")
    ref.generation_config = hf_generation_config(tok)
    p = model.config.processor
    tokens = conn.num_tokens(tower.grid(p.image_size))
    image_processor = SiglipImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, image_mean=list(p.mean),
                                              image_std=list(p.std), resample=_RESAMPLE_IDS[p.resample], image_seq_length=tokens)
    template = plain_template(tok)
    # vlmkit's restatement of the processor's layout (as imports before content lists wrote it, too)
    template = template if template not in (PALIGEMMA_TEMPLATE, _STRINGS_ONLY_TEMPLATE) else None
    # The processor adds its location / segmentation tokens to the tokenizer it is given: a copy.
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)
    return save_with_processor(ref, processor, out)


def _paligemma_reference(model, prompt, ids):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images]),
                                               "token_type_ids": torch.zeros_like(ids)}


PALIGEMMA = HFFamily(("paligemma",), "PaliGemma / PaliGemma 2 (PaliGemmaForConditionalGeneration)", import_paligemma,
                     export_paligemma, _is_paligemma, _paligemma_reference, specificity=7)
