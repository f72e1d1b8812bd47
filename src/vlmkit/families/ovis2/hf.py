"""Ovis2 folders (`ovis2`, `Ovis2ForConditionalGeneration`) <-> vlmkit checkpoints.

* the ViT (`vision_tower.transformer`: RMSNorm, SwiGLU, learned positions, a final RMSNorm) is
  transformers' AIMv2 vision model without its pooling head, tensor for tensor
  (`patch_embedding` is AIMv2's `patch_embed`): an `hf-random` `aimv2_vision_model` tower read
  at its output;
* the visual tokenizer (`vision_tower.head_linear`, `head_norm`, the `tokenize_function`, the
  `hidden_stride` fold) and `visual_embeddings_table` as the core `visual-embedding-table`
  connector, whose marker rows embed the config's `visual_indicator_token_ids`;
* the Qwen2 decoder as the `hf` LLM;
* the image processor's settings (tile size, max patches, covering-area grid, mean / std,
  resample) and `Ovis2Processor`'s `image_seq_length` as the `ovis2` processor.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.ovis2.processor import CLIP_MEAN, CLIP_STD, TAGS
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
    read_json,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, processor_is, read_hf_config
from vlmkit.hf.templates import chat_template, template_source, usable_template
from vlmkit.hf.writing import (
    build_imported,
    hf_generation_config,
    load_reference,
    save_with_processor,
    stage_llm,
    write_checkpoint,
)
from vlmkit.model.connectors.embedding_table import EmbeddingTableConnector
from vlmkit.model.vision import HFVisionTower

IMAGE_TOKEN = "<IMG_ATOM>"
TOWER = "aimv2_vision_model"
TOWER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
              "patch_size", "rms_norm_eps", "attention_dropout", "qkv_bias", "mlp_bias", "hidden_act", "initializer_range")


def _tower_config(vision_cfg) -> dict:
    """Ovis2's ViT settings as an AIMv2 vision config (no pooling head, learned positions)."""
    return {k: getattr(vision_cfg, k) for k in TOWER_KEYS} | {"use_head": False, "is_native": False}


def _tower_state(state: dict) -> dict:
    """`vision_tower.transformer.*` -> AIMv2 names."""
    return {k.replace("embeddings.patch_embedding.", "embeddings.patch_embed."): v for k, v in state.items()}


def _check_config(folder: Path, cfg) -> None:
    text = cfg.text_config
    if cfg.vocab_size != text.vocab_size or cfg.hidden_size != text.hidden_size:
        raise ExportError(f"{folder}: vocab_size / hidden_size ({cfg.vocab_size}, {cfg.hidden_size}) differ from the text "
                          f"config's ({text.vocab_size}, {text.hidden_size}); vlmkit reads one LLM table and head")
    vision = cfg.vision_config
    if len(cfg.visual_indicator_token_ids) != vision.num_visual_indicator_tokens:
        raise ExportError(f"{folder}: {len(cfg.visual_indicator_token_ids)} visual_indicator_token_ids for "
                          f"num_visual_indicator_tokens={vision.num_visual_indicator_tokens}")


def _markers(folder: Path, cfg, tokenizer) -> list[str]:
    """The indicator tokens in the table's row order, as strings of the folder's vocabulary."""
    markers = tokenizer.convert_ids_to_tokens(list(cfg.visual_indicator_token_ids))
    for token_id, token in zip(cfg.visual_indicator_token_ids, markers):
        if token is None:
            raise ExportError(f"{folder / 'config.json'}: visual_indicator_token_ids names {token_id}, which the tokenizer lacks")
    for token in TAGS.values():
        if token not in markers:
            raise ExportError(f"{folder / 'config.json'}: Ovis2Processor writes {token}, which visual_indicator_token_ids "
                              f"({markers}) does not embed")
    return markers


def _processor_config(folder: Path, cfg, stride: int) -> dict:
    settings = image_processor_settings(folder)
    vision = cfg.vision_config
    size = settings.get("size") or {"height": 384, "width": 384}
    if size.get("height") != size.get("width") or size["height"] != vision.image_size:
        raise ExportError(f"{folder}: the image processor's tile size {size} differs from the tower's square image_size "
                          f"{vision.image_size}")
    per_tile = (vision.image_size // vision.patch_size // stride) ** 2
    seq = read_json(folder / "processor_config.json").get("image_seq_length", 256)
    if seq != per_tile:
        raise ExportError(f"{folder}: Ovis2Processor writes image_seq_length={seq} atoms per tile, the model makes "
                          f"({vision.image_size} // {vision.patch_size} // {stride})^2 = {per_tile}")
    crop = bool(settings.get("crop_to_patches", False))
    return {"name": "ovis2", "image_size": vision.image_size, "mean": list(settings.get("image_mean", CLIP_MEAN)),
            "std": list(settings.get("image_std", CLIP_STD)), "resample": resample_name(settings),
            "options": {"patch_size": vision.patch_size, "downsample_ratio": 1 / stride,
                        "min_num": int(settings.get("min_patches", 1)), "max_num": int(settings.get("max_patches", 12)) if crop else 1,
                        "covering": bool(settings.get("use_covering_area_grid", True)), "sentinels": "never"}}


def _import_ovis2(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    _check_config(folder, cfg)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    parts = split_state(read_weights(folder), {
        "model.vision_tower.transformer.": "vision", "vision_tower.transformer.": "vision",
        "model.vision_tower.": "head", "vision_tower.": "head",
        "model.visual_embeddings_table.": "table", "visual_embeddings_table.": "table",
        "model.language_model.": "llm", "language_model.model.": "llm", "language_model.lm_head.": "lm_head", "lm_head.": "lm_head"})
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["lm_head"].items()}
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, IMAGE_TOKEN, str(folder / "tokenizer.json"))
    markers = _markers(folder, cfg, tokenizer)
    template = chat_template(folder, tokenizer)
    if not template:
        raise ExportError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
    tokenizer.chat_template = usable_template(template, tokenizer, IMAGE_TOKEN, template_source(folder))
    stride = vision_cfg.hidden_stride
    processor = _processor_config(folder, cfg, stride)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": TOWER, "config": _tower_config(vision_cfg)},
            "connector": {"name": "visual-embedding-table", "options": {
                "vocab_size": vision_cfg.vocab_size, "ratio": 1 / stride, "tokenize": vision_cfg.tokenize_function,
                "markers": markers}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": processor,
            "image_token": IMAGE_TOKEN,
        }})
        model = build_imported(config, IMAGE_TOKEN, cfg.image_token_id)
        load_part(model.vision.model, _tower_state(parts["vision"]), "vision tower", "model.vision_tower.transformer.")
        table = {f"table.{k}": v for k, v in parts["table"].items()}
        load_part(model.connector, parts["head"] | table, "visual tokenizer and visual_embeddings_table", "model.vision_tower.")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_exportable(model) -> None:
    conn, tower = model.connector, model.vision
    if (not isinstance(conn, EmbeddingTableConnector) or not isinstance(tower, HFVisionTower)
            or tower.model.config.model_type != TOWER or tower.feature_layer != -1 or tower.model.config.use_head
            or tower.model.config.is_native):
        raise ExportError("Ovis2 needs an AIMv2 vision tower (no head, learned positions) read at its output and the "
                          "visual-embedding-table connector")
    if sorted(conn.marker_tokens()) != sorted(TAGS.values()):
        raise ExportError(f"Ovis2 embeds the structure tokens {sorted(TAGS.values())} with its table; the connector's "
                          f"markers are {list(conn.marker_tokens())}")


@torch.no_grad()
def _reference_model(model):
    """transformers' Ovis2ForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    _check_exportable(model)
    conn, tower, llm_cfg = model.connector, model.vision, model.llm.config
    tower_cfg = tower.model.config
    vision = {k: getattr(tower_cfg, k) for k in TOWER_KEYS} | {
        "vocab_size": conn.options.vocab_size, "hidden_stride": conn.factor, "tokenize_function": conn.options.tokenize,
        "num_visual_indicator_tokens": len(conn.marker_tokens())}
    tied = bool(getattr(llm_cfg, "tie_word_embeddings", False))
    config = Ovis2Config(vision_config=vision, text_config=hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type},
                         image_token_id=model.image_token_id, visual_indicator_token_ids=list(model.marker_ids),
                         vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size, tie_word_embeddings=tied)
    ref = Ovis2ForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.transformer.{k.replace('embeddings.patch_embed.', 'embeddings.patch_embedding.')}": v
             for k, v in tower.model.state_dict().items()}
    state |= {f"model.vision_tower.{k}": v for k, v in conn.state_dict().items() if k.startswith("head_")}
    state["model.visual_embeddings_table.weight"] = conn.table.weight
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "Ovis2")
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


def _export_ovis2(model, out: Path) -> Path:
    from transformers import Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    ref = _reference_model(model)
    p, proc = model.config.processor, model.image_processor
    image_processor = Ovis2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, crop_to_patches=proc.max_num > 1,
                                            min_patches=proc.min_num, max_patches=proc.max_num, use_covering_area_grid=proc.covering,
                                            image_mean=list(p.mean), image_std=list(p.std),
                                            resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    tok = copy.deepcopy(model.tokenizer)  # the processor's copy; the model's tokenizer stays as it is
    processor = Ovis2Processor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template,
                               image_seq_length=proc.tokens_per_tile)
    return save_with_processor(ref, processor, out)


def _reference(model, prompt, ids):
    from transformers import Ovis2ForConditionalGeneration

    return Ovis2ForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])}


OVIS2 = HFFamily(("ovis2",), "Ovis2 (Ovis2ForConditionalGeneration)", _import_ovis2, _export_ovis2, processor_is("ovis2"),
                 _reference, specificity=5)
