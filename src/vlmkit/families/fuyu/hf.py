"""Fuyu folders <-> vlmkit checkpoints: the encoder-free family.

* no vision encoder: the `patchify` tower cuts the image into `patch_size` patches flattened in
  Fuyu's (row, col, channel) order, and `vision_embed_tokens` is the `patch-embed` connector (one
  linear layer into the LLM);
* the Persimmon decoder (or any causal LM the config names) as the `hf` LLM;
* the `fuyu` processor with the folder's canvas (`size`), patch size, mean / std, resampling and
  padding value: one `|SPEAKER|` image token per patch, `|NEWLINE|` after each patch row and
  `<s>` after the image, as `FuyuProcessor` writes them.

`FuyuProcessor` puts the image before the text and ends the prompt with `<0x04>` (beginning of
answer). Folders ship no chat template; import writes one (`FUYU_TEMPLATE`) that ends each user
turn with `<0x04>` and each assistant turn with EOS, so `<image>` followed by the question gives
the processor's ids (the newline vlmkit's `chat` and eval write after a leading `<image>` is
dropped). Fuyu takes one image per prompt.
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
    load_tokenizer,
    max_positions,
    read_weights,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import chat_template, template_source, usable_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.patch_embed import PatchEmbedConnector, PatchifyTower

BEGINNING_OF_ANSWER = "<0x04>"
FUYU_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- else -%}{%- set c = m['content'] -%}"
    # The newline vlmkit's chat / eval write after a leading <image> is no part of the text.
    "{%- if c.startswith('|SPEAKER|') -%}{%- set c = c.replace('<s>\n', '<s>', 1) -%}{%- endif -%}"
    "{{ c + '" + BEGINNING_OF_ANSWER + "' }}{%- endif -%}"
    "{%- endfor -%}"
)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _mean_std(value, default: float) -> list[float]:
    value = default if value is None else value
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def _import_fuyu(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    text_cfg = cfg.text_config
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_embed_tokens.": "patch", "vision_embed_tokens.": "patch",
                                "model.language_model.": "llm", "language_model.model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    patch = parts["patch"]
    if "weight" not in patch:
        raise ExportError(f"{folder}: vision_embed_tokens.weight is missing")
    llm_state = causal_lm_state(parts)

    settings = image_processor_settings(folder)
    size = settings.get("size") or {"height": 1080, "width": 1920}
    patch_size = (settings.get("patch_size") or {}).get("height", cfg.patch_size)
    if patch_size != cfg.patch_size or (settings.get("patch_size") or {}).get("width", patch_size) != patch_size:
        raise ExportError(f"{folder}: the image processor's patch size {settings.get('patch_size')} differs from config.json's "
                          f"square patch_size {cfg.patch_size}")
    if settings.get("do_pad") is False or settings.get("padding_mode", "constant") != "constant":
        raise ExportError(f"{folder}: the image processor pads with mode {settings.get('padding_mode')!r} "
                          f"(do_pad={settings.get('do_pad')}); vlmkit's fuyu processor pads with a constant")
    tokenizer = load_tokenizer(folder)
    image_token = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
    vocab = tokenizer.get_vocab()
    for needed in ("|SPEAKER|", "|NEWLINE|", "<s>"):
        if needed not in vocab:
            raise ExportError(f"{folder}: the tokenizer has no {needed!r} token, which Fuyu's prompt layout needs")
    if image_token != "|SPEAKER|":
        raise ExportError(f"{folder}: config.json's image_token_id {cfg.image_token_id} is {image_token!r}, not '|SPEAKER|'")
    template = chat_template(folder, tokenizer)
    tokenizer.chat_template = (FUYU_TEMPLATE if not template or template == FUYU_TEMPLATE
                               else usable_template(template, tokenizer, image_token, template_source(folder)))

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "patchify", "config": {"patch_size": cfg.patch_size, "num_channels": cfg.num_channels}},
            "connector": {"name": "patch-embed", "options": {"bias": "bias" in patch}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "fuyu", "image_size": size["height"],
                          "mean": _mean_std(settings.get("image_mean"), 0.5), "std": _mean_std(settings.get("image_std"), 0.5),
                          "resample": _RESAMPLE.get(settings.get("resample", 2), "bilinear"),
                          "options": {"max_height": size["height"], "max_width": size["width"], "patch_size": patch_size,
                                      "pad_value": float(settings.get("padding_value", 1.0)), "sentinels": "never"}},
            "image_token": image_token,
        }})
        model = build_imported(config)
        load_part(model.connector, {f"proj.{k}": v for k, v in patch.items()}, "patch embedding", "vision_embed_tokens(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_fuyu(model) -> bool:
    return model.config.processor.name == "fuyu"


@torch.no_grad()
def _export_fuyu(model, out: Path) -> Path:
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    conn, tower = model.connector, model.vision
    if not isinstance(conn, PatchEmbedConnector) or not isinstance(tower, PatchifyTower):
        raise ExportError("Fuyu needs the patchify tower and the patch-embed connector")
    tok = model.tokenizer
    p, proc = model.config.processor, model.image_processor
    if len(set(p.mean)) != 1 or len(set(p.std)) != 1:
        # FuyuImageProcessor takes lists too; one value is what released folders hold.
        mean, std = list(p.mean), list(p.std)
    else:
        mean, std = p.mean[0], p.std[0]
    llm_cfg = model.llm.config
    text = hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type}
    config = FuyuConfig(text_config=text, patch_size=tower.patch_size, num_channels=tower.hidden_size // tower.patch_size**2,
                        image_token_id=model.image_token_id, image_size=proc.max_height,
                        tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)))
    ref = FuyuForCausalLM(config).eval()
    state = {f"model.vision_embed_tokens.{k[len('proj.'):]}": v for k, v in conn.state_dict().items()}
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    if not conn.options.bias:
        raise ExportError("Fuyu's vision_embed_tokens has a bias: export needs patch-embed with bias: true")
    load_reference(ref, state, "Fuyu")
    ref.generation_config = hf_generation_config(tok)
    image_processor = FuyuImageProcessorPil(size={"height": proc.max_height, "width": proc.max_width},
                                            patch_size={"height": proc.patch_size, "width": proc.patch_size},
                                            image_mean=mean, image_std=std, padding_value=proc.pad_value,
                                            resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    # FuyuProcessor sets its tokenizer's pad_token_id: it gets a copy, never the model's own.
    processor = FuyuProcessor(image_processor=image_processor, tokenizer=copy.deepcopy(tok))

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return atomic_folder(Path(out), write)


def _reference(model, prompt, ids):
    from transformers import FuyuForCausalLM

    image = prompt.images[0]
    return FuyuForCausalLM, {"pixel_values": model.vision(image.pixel_values)[0]}


FUYU = HFFamily(("fuyu",), "Fuyu (FuyuForCausalLM, encoder-free)", _import_fuyu, _export_fuyu, _is_fuyu, _reference, specificity=13)
