"""BLIP-2 and InstructBLIP folders <-> vlmkit checkpoints.

* the vision transformer as the `hf-blip` tower (transformers' own `Blip2VisionModel` /
  `InstructBlipVisionModel`, every token of the last layer after the post-LayerNorm, CLS included);
* the Q-Former plus `language_projection` as vlmkit's `qformer` connector, which has the same
  post-LayerNorm BERT layers (self-attention, cross-attention every `cross_attention_frequency`
  layers from layer 0, the query FFN; exact GELU), the learned queries and the LayerNorm on them;
  InstructBLIP's Q-Former also reads the instruction (`text_input`: word + position embeddings,
  the text FFN, its own tokenizer kept as `llm/qformer_tokenizer`);
* any decoder-only causal LM (OPT, Llama, ...) as the `hf` LLM; an encoder-decoder (Flan-T5) LLM
  is refused;
* the `fixed` processor, `fit: squash` (BLIP's processor resizes to the square without keeping
  the aspect ratio), with the folder's size, mean / std and resampling.

The prompt is what `Blip2Processor` / `InstructBlipProcessor` build: `num_query_tokens` image
tokens first (wherever the placeholder stood), then the tokenizer's BOS and the text. Folders
ship no chat template, so import writes one that does exactly that (`BLIP_TEMPLATE`): the image
tokens of a turn go before its text, BOS before the first turn's text, an assistant turn follows
after a space and ends with EOS; the newline vlmkit's `chat` and eval write after a leading
`<image>` is dropped, so "<image>\nWhat?" and "<image>What?" give the processor's ids for "What?". These models take one image per prompt; InstructBLIP's Q-Former
reads the text of the message holding the image (its placeholders removed), as the processor's
`qformer_input_ids` hold the whole prompt text.
"""

from __future__ import annotations

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
    read_json,
    read_weights,
    resample_name,
    split_state,
)
from vlmkit.hf.output_folder import staging_folder
from vlmkit.hf.registry import HFFamily, read_hf_config
from vlmkit.hf.templates import chat_template, template_source, usable_template
from vlmkit.hf.writing import atomic_folder, build_imported, hf_generation_config, load_reference, stage_llm, write_checkpoint
from vlmkit.model.connectors.qformer import QFormerConnector

QFORMER_TOKENIZER = "qformer_tokenizer"


def blip_template(image_token: str) -> str:
    """The chat template of an imported BLIP-2 / InstructBLIP model: its processor's layout."""
    t = image_token.replace("'", "\\'")
    return (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}"
        "{%- else -%}"
        f"{{%- set n = m['content'].count('{t}') -%}}"
        f"{{%- set text = m['content'].replace('{t}', '') -%}}"
        # The newline vlmkit's chat / eval write after a leading <image> is no part of the text.
        "{%- if n and m['content'].startswith('" + t + "') and text.startswith('\n') -%}{%- set text = text[1:] -%}{%- endif -%}"
        f"{{{{ '{t}' * n }}}}"
        "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ text }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


# (vlmkit qformer connector key, HF Q-Former key) per layer, for the parts every layer has.
_ATTENTION = {"attn.q_proj": "attention.query", "attn.k_proj": "attention.key", "attn.v_proj": "attention.value",
              "attn.o_proj": "output.dense", "norm": "output.LayerNorm"}


def _layer_names(i: int, cross: bool, text: bool) -> dict[str, str]:
    names = {}
    for ours, theirs in _ATTENTION.items():
        names[f"layers.{i}.self_attn.{ours}"] = f"encoder.layer.{i}.attention.{theirs}"
        if cross:
            names[f"layers.{i}.cross_attn.{ours}"] = f"encoder.layer.{i}.crossattention.{theirs}"
    names[f"layers.{i}.ffn.fc1"] = f"encoder.layer.{i}.intermediate_query.dense"
    names[f"layers.{i}.ffn.fc2"] = f"encoder.layer.{i}.output_query.dense"
    names[f"layers.{i}.ffn.norm"] = f"encoder.layer.{i}.output_query.LayerNorm"
    if text:
        names[f"layers.{i}.text_ffn.fc1"] = f"encoder.layer.{i}.intermediate.dense"
        names[f"layers.{i}.text_ffn.fc2"] = f"encoder.layer.{i}.output.dense"
        names[f"layers.{i}.text_ffn.norm"] = f"encoder.layer.{i}.output.LayerNorm"
    return names


def qformer_names(layers: int, frequency: int, text: bool, instruct: bool) -> dict[str, str]:
    """vlmkit `qformer` connector module -> the HF Q-Former module (inside `qformer.`), for
    weights and biases alike; the query tokens and the projection are mapped by the caller."""
    names = {"layernorm": "embeddings.layernorm" if instruct else "layernorm"}
    if instruct:
        names |= {"word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings"}
    for i in range(layers):
        names |= _layer_names(i, i % frequency == 0, text)
    return names


def _expand(names: dict[str, str], state_keys) -> dict[str, str]:
    """Module names -> parameter names (weight, bias) that exist in `state_keys` (ours)."""
    out = {}
    keys = set(state_keys)
    for ours, theirs in names.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in keys:
                out[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    return out


def _check_blip_config(folder: Path, cfg) -> None:
    """Refuse what vlmkit's Q-Former and LLM cannot hold: an encoder-decoder LLM, a non-GELU
    Q-Former, a Q-Former that reads features of another width than the tower's."""
    vision_cfg, q_cfg, text_cfg = cfg.vision_config, cfg.qformer_config, cfg.text_config
    if not cfg.use_decoder_only_language_model:
        raise ExportError(f"{folder / 'config.json'}: the language model is {text_cfg.model_type!r}, an encoder-decoder; "
                          "vlmkit imports BLIP-2 / InstructBLIP with a decoder-only LLM (OPT, Llama, Vicuna ...)")
    if q_cfg.hidden_act != "gelu":
        raise ExportError(f"{folder / 'config.json'}: Q-Former activation {q_cfg.hidden_act!r}; vlmkit's Q-Former uses exact GELU")
    if q_cfg.encoder_hidden_size != vision_cfg.hidden_size:
        raise ExportError(f"{folder / 'config.json'}: the Q-Former reads {q_cfg.encoder_hidden_size}-wide features but the "
                          f"vision tower makes {vision_cfg.hidden_size}")


def _blip_parts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's weights split into vision / qformer / queries / projection / llm / head,
    from either of transformers' layouts."""
    state = read_weights(folder)
    parts = split_state(state, {"vision_model.": "vision", "model.vision_model.": "vision", "qformer.": "qformer",
                                "model.qformer.": "qformer", "query_tokens": "queries", "model.query_tokens": "queries",
                                "language_projection.": "projection", "model.language_projection.": "projection",
                                "language_model.model.": "llm", "model.language_model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    if "" not in parts["queries"]:
        raise ExportError(f"{folder}: query_tokens is missing")
    return parts


def _check_blip_processor(folder: Path, cfg, settings: dict) -> None:
    """The processor must resize to the tower's square and make as many queries as the model."""
    vision_cfg = cfg.vision_config
    size = settings.get("size") or {}
    height, width = size.get("height", vision_cfg.image_size), size.get("width", vision_cfg.image_size)
    if height != width or height != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's size {width}x{height} differs from the vision tower's "
                          f"square image_size {vision_cfg.image_size}")
    processor_cfg = read_json(folder / "processor_config.json")
    num_queries = processor_cfg.get("num_query_tokens", cfg.num_query_tokens)
    if num_queries != cfg.num_query_tokens:
        raise ExportError(f"{folder / 'processor_config.json'}: num_query_tokens {num_queries} differs from config.json's "
                          f"{cfg.num_query_tokens}")


def _blip_tokenizer(folder: Path, cfg):
    """(image token, its id, the folder's tokenizer with the chat template vlmkit will use)."""
    image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    tokenizer = load_tokenizer(folder)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id is not None else None
    if not image_token:
        raise ExportError(f"{folder}: config.json's image_token_id {image_token_id} is not a token of the tokenizer")
    template = chat_template(folder, tokenizer)
    ours = blip_template(image_token)
    # An exported model's folder carries vlmkit's own template back: it is used as it is.
    tokenizer.chat_template = ours if not template or template == ours else usable_template(template, tokenizer, image_token,
                                                                                                         template_source(folder))
    return image_token, image_token_id, tokenizer


def _blip_recipe(cfg, settings: dict, staged_llm: Path, image_token: str, text_ffn: bool, instruct: bool) -> dict:
    """The vlmkit recipe of the imported model: the hf-blip tower, the qformer connector, the
    staged LLM and the fixed (squash) processor with the folder's settings."""
    vision_cfg, q_cfg = cfg.vision_config, cfg.qformer_config
    options = {"num_queries": cfg.num_query_tokens, "hidden_size": q_cfg.hidden_size, "layers": q_cfg.num_hidden_layers,
               "heads": q_cfg.num_attention_heads, "intermediate_size": q_cfg.intermediate_size,
               "cross_attention_frequency": q_cfg.cross_attention_frequency, "layer_norm_eps": q_cfg.layer_norm_eps,
               "text_ffn": text_ffn}
    if instruct:
        options |= {"text_vocab": q_cfg.vocab_size, "max_text_positions": q_cfg.max_position_embeddings,
                    "text_input": True, "text_tokenizer": QFORMER_TOKENIZER}
    return {"model": {
        "vision": {"name": "hf-blip", "model_type": vision_cfg.model_type, "config": hf_config_dict(vision_cfg)},
        "connector": {"name": "qformer", "options": options},
        "llm": {"name": "hf", "path": str(staged_llm)},
        "processor": {"name": "fixed", "image_size": vision_cfg.image_size,
                      "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                      "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                      "resample": resample_name(settings), "options": {"fit": "squash", "sentinels": "never"}},
        "image_token": image_token,
    }}


def _connector_state(folder: Path, parts: dict, conn, q_cfg, text_ffn: bool, instruct: bool) -> dict[str, torch.Tensor]:
    """The Q-Former, query tokens and language projection as the qformer connector's state; every
    tensor the connector has must be in the folder, and every Q-Former tensor must have a place."""
    names = _expand(qformer_names(q_cfg.num_hidden_layers, q_cfg.cross_attention_frequency, text_ffn, instruct),
                    conn.state_dict())
    q = parts["qformer"]
    absent = sorted(theirs for theirs in names.values() if theirs not in q)
    if absent:
        raise ExportError(f"{folder}: Q-Former tensors are missing: {['qformer.' + k for k in absent[:5]]}")
    unused = sorted(set(q) - set(names.values()) - {"embeddings.position_ids"})
    if unused:
        raise ExportError(f"{folder}: Q-Former tensors the config has no place for: {['qformer.' + k for k in unused[:5]]}")
    p = parts["projection"]
    if "weight" not in p or "bias" not in p:
        raise ExportError(f"{folder}: language_projection.weight / bias are missing")
    state = {ours: q[theirs] for ours, theirs in names.items()}
    return state | {"query_tokens": parts["queries"][""], "proj.weight": p["weight"], "proj.bias": p["bias"]}


def _import_blip(folder: Path, out: Path) -> Path:
    # transformers is heavy: loaded only when a folder is imported
    from transformers import AutoTokenizer

    folder, out = Path(folder), Path(out).resolve()
    instruct = read_hf_config(folder)["model_type"] == "instructblip"
    cfg = auto_config(folder)
    _check_blip_config(folder, cfg)
    q_cfg, text_cfg = cfg.qformer_config, cfg.text_config
    text_ffn = instruct or bool(getattr(q_cfg, "use_qformer_text_input", False))
    parts = _blip_parts(folder)
    llm_state = causal_lm_state(parts)
    settings = image_processor_settings(folder)
    _check_blip_processor(folder, cfg, settings)
    image_token, image_token_id, tokenizer = _blip_tokenizer(folder, cfg)
    if instruct and not (folder / QFORMER_TOKENIZER).is_dir():
        raise ExportError(f"{folder} has no {QFORMER_TOKENIZER}/ folder: InstructBLIP's Q-Former reads the instruction "
                          "with its own tokenizer")

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        if instruct:
            AutoTokenizer.from_pretrained(folder / QFORMER_TOKENIZER, local_files_only=True).save_pretrained(staged_llm / QFORMER_TOKENIZER)
        config = load_config(_blip_recipe(cfg, settings, staged_llm, image_token, text_ffn, instruct))
        model = build_imported(config, image_token, image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "vision_model.")
        load_part(model.connector, _connector_state(folder, parts, model.connector, q_cfg, text_ffn, instruct),
                  "Q-Former", "qformer(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_blip(model, instruct: bool) -> bool:
    return (model.config.vision.name == "hf-blip" and isinstance(model.connector, QFormerConnector)
            and bool(model.connector.options.text_input) == instruct)


@torch.no_grad()
def _export_blip(model, out: Path, instruct: bool) -> Path:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    conn, tower = model.connector, model.vision
    o = conn.options
    p = model.config.processor
    if o.input_norm or p.name != "fixed" or p.options.get("fit") != "squash":
        raise ExportError("BLIP-2 / InstructBLIP need the fixed processor with fit: squash and a Q-Former without input_norm")
    tok = model.tokenizer
    llm_cfg = model.llm.config
    text = hf_config_dict(llm_cfg) | {"model_type": llm_cfg.model_type}
    qformer = {"hidden_size": o.hidden_size, "num_hidden_layers": o.layers, "num_attention_heads": o.heads,
               "intermediate_size": o.intermediate_size, "cross_attention_frequency": o.cross_attention_frequency,
               "layer_norm_eps": o.layer_norm_eps, "encoder_hidden_size": tower.hidden_size, "hidden_act": "gelu"}
    if instruct:
        qformer |= {"vocab_size": o.text_vocab, "max_position_embeddings": o.max_text_positions}
    else:
        qformer |= {"use_qformer_text_input": o.text_ffn}
    config_cls, model_cls = (InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct else (Blip2Config, Blip2ForConditionalGeneration)
    config = config_cls(vision_config=hf_config_dict(tower.model.config), qformer_config=qformer, text_config=text,
                        num_query_tokens=o.num_queries, image_token_id=model.image_token_id,
                        tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)))
    ref = model_cls(config).eval()
    cstate = conn.state_dict()
    names = _expand(qformer_names(o.layers, o.cross_attention_frequency, o.text_ffn, instruct), cstate)
    state = {f"vision_model.{k}": v for k, v in tower.model.state_dict().items()}
    state |= {f"qformer.{theirs}": cstate[ours] for ours, theirs in names.items()}
    state |= {"query_tokens": cstate["query_tokens"], "language_projection.weight": cstate["proj.weight"],
              "language_projection.bias": cstate["proj.bias"]}
    state |= {f"language_model.{k}": v for k, v in model.llm.state_dict().items()}
    load_reference(ref, state, "InstructBLIP" if instruct else "BLIP-2")
    ref.generation_config = hf_generation_config(tok)
    image_processor = BlipImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, image_mean=list(p.mean),
                                            image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    if instruct:
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tok,
                                          qformer_tokenizer=conn.load_text_tokenizer(model.config),
                                          num_query_tokens=o.num_queries)
    else:
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=o.num_queries)

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return atomic_folder(Path(out), write)


def _reference(instruct: bool):
    def reference(model, prompt, ids):
        from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

        image = prompt.images[0]
        if not instruct:
            return Blip2ForConditionalGeneration, {"pixel_values": image.pixel_values}
        return InstructBlipForConditionalGeneration, {"pixel_values": image.pixel_values, "qformer_input_ids": image.instruction_ids[None]}

    return reference


BLIP2 = HFFamily(("blip-2",), "BLIP-2 (Blip2ForConditionalGeneration, decoder-only LLM)", _import_blip,
                 lambda model, out: _export_blip(model, out, instruct=False), lambda model: _is_blip(model, False),
                 _reference(False), specificity=12)
INSTRUCTBLIP = HFFamily(("instructblip",), "InstructBLIP (InstructBlipForConditionalGeneration, decoder-only LLM)", _import_blip,
                        lambda model, out: _export_blip(model, out, instruct=True), lambda model: _is_blip(model, True),
                        _reference(True), specificity=12)
