"""Idefics2 (`idefics2`, transformers' `Idefics2ForConditionalGeneration`).

* vision: Idefics2's own vision transformer (SigLIP layers, fractional position ids for any
  image size), the `idefics2-vision` tower, last layer after its final LayerNorm;
* connector: vlmkit's `perceiver`, whose math is `Idefics2Connector`'s exactly: the SwiGLU
  modality projection to the LLM width (`input_proj: swiglu`, hidden = the LLM's intermediate
  size), `resampler_depth` layers of RMSNorm'd latents attending to [context; latents]
  (grouped-query, no biases) plus a SwiGLU FFN of 4x width, a final RMSNorm, no output
  projection. (transformers masks padded patches; vlmkit's views have none.)
* LLM: any causal LM (Mistral in the released models) from the folder's weights;
* processor: the `idefics2` family (`processor.py` beside this module) with the folder's shortest /
  longest edge, splitting, mean / std, resample and `image_seq_len`.

Export writes transformers' folder: config and weights, `Idefics2ImageProcessorPil`'s
settings, and the processor (`Idefics2Processor`, tokenizer and chat template).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.families.idefics2.model import TOWER
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
from vlmkit.hf.writing import (
    build_imported,
    hf_generation_config,
    load_reference,
    save_with_processor,
    stage_llm,
    write_checkpoint,
)
from vlmkit.model.connectors.perceiver import PerceiverConnector

# Idefics2Connector's tensors (under model.connector.) -> vlmkit's perceiver's.
_LAYER_NAMES = {"input_latents_norm": "latent_norm", "input_context_norm": "context_norm", "self_attn": "attn",
                "post_attention_layernorm": "ffn_norm", "mlp": "ffn"}


def connector_key(theirs: str) -> str:
    """`modality_projection.gate_proj.weight` -> `input_proj.gate_proj.weight`,
    `perceiver_resampler.layers.0.self_attn.q_proj.weight` -> `layers.0.attn.q_proj.weight` ..."""
    if theirs.startswith("modality_projection."):
        return "input_proj." + theirs[len("modality_projection."):]
    if not theirs.startswith("perceiver_resampler."):
        raise ExportError(f"connector tensor model.connector.{theirs} has no place in the Perceiver resampler")
    rest = theirs[len("perceiver_resampler."):]
    parts = rest.split(".")
    if parts[0] == "layers" and len(parts) > 2:
        parts[2] = _LAYER_NAMES.get(parts[2], parts[2])
    return ".".join(parts)


def their_connector_key(ours: str) -> str:
    if ours.startswith("input_proj."):
        return "modality_projection." + ours[len("input_proj."):]
    parts = ours.split(".")
    if parts[0] == "layers" and len(parts) > 2:
        parts[2] = {v: k for k, v in _LAYER_NAMES.items()}.get(parts[2], parts[2])
    return "perceiver_resampler." + ".".join(parts)


def import_idefics2(folder: Path, out: Path) -> Path:
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg, perceiver = cfg.vision_config, cfg.text_config, cfg.perceiver_config
    for what, act in (("text_config.hidden_act", text_cfg.hidden_act), ("perceiver_config.hidden_act", perceiver.hidden_act)):
        if act != "silu":
            raise ExportError(f"{folder / 'config.json'}: {what} is {act!r}; vlmkit's perceiver uses SwiGLU (silu)")
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_model.": "vision", "vision_model.": "vision", "model.connector.": "connector",
                                "connector.": "connector", "model.text_model.": "llm", "text_model.": "llm", "lm_head.": "head"})
    connector_state = {connector_key(k): v for k, v in parts["connector"].items()}
    llm_state = causal_lm_state(parts)
    settings = image_processor_settings(folder)
    size = settings.get("size") or {}
    shortest, longest = size.get("shortest_edge", 378), size.get("longest_edge", 980)
    processor_cfg = read_json(folder / "processor_config.json")
    seq = int(processor_cfg.get("image_seq_len", perceiver.resampler_n_latents))
    if seq != perceiver.resampler_n_latents:
        raise ExportError(f"{folder}: processor_config.json's image_seq_len {seq} differs from the resampler's "
                          f"{perceiver.resampler_n_latents} latents")
    image_token = "<image>"
    tokenizer = folder_tokenizer(folder, image_token)

    tmp = staging_folder(out)
    try:
        staged_llm = stage_llm(tmp, causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": TOWER, "config": hf_config_dict(vision_cfg)},
            "connector": {"name": "perceiver", "options": {
                "latents": perceiver.resampler_n_latents, "layers": perceiver.resampler_depth, "heads": perceiver.resampler_n_heads,
                "head_dim": perceiver.resampler_head_dim, "kv_heads": perceiver.num_key_value_heads, "width": text_cfg.hidden_size,
                "ffn": "swiglu", "ffn_mult": 4, "norm": "rmsnorm", "norm_eps": perceiver.rms_norm_eps, "input_proj": "swiglu",
                "input_proj_hidden": text_cfg.intermediate_size, "project_output": False}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "idefics2", "image_size": shortest, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": resample_name({"resample": settings.get("resample", 2)}),
                          "options": {"longest_edge": longest, "patch_size": vision_cfg.patch_size, "image_seq_len": seq,
                                      "do_image_splitting": bool(settings.get("do_image_splitting", False)), "sentinels": "never"}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_model.")
        load_part(model.connector, connector_state, "connector", "model.connector(mapped) ")
        return write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_exportable(model) -> None:
    conn = model.connector
    o = conn.options if isinstance(conn, PerceiverConnector) else None
    if (model.config.processor.name != "idefics2" or model.config.vision.name != TOWER or o is None
            or o.input_proj != "swiglu" or o.ffn != "swiglu" or o.ffn_mult != 4 or o.norm != "rmsnorm" or o.project_output
            or o.output != "tokens" or (o.width or conn.vision_dim) != conn.llm_dim or model.vision.feature_layer != -1):
        raise ExportError("Idefics2 needs the idefics2-vision tower (last layer), the idefics2 processor and a perceiver connector "
                          "with a SwiGLU input projection and FFN (x4), RMSNorm, latents at the LLM width and no output projection")


@torch.no_grad()
def idefics2_reference(model):
    """transformers' Idefics2ForConditionalGeneration holding the vlmkit model's weights."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    _check_exportable(model)
    conn, o = model.connector, model.connector.options
    text = hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    if text.get("hidden_act", "silu") != "silu":
        raise ExportError(f"Idefics2's modality projection uses the LLM's activation; vlmkit's is SwiGLU (silu), the LLM's {text['hidden_act']!r}")
    intermediate = conn.input_proj.up_proj.out_features
    if intermediate != text.get("intermediate_size"):
        raise ExportError(f"Idefics2's modality projection is as wide as the LLM's MLP ({text.get('intermediate_size')}), "
                          f"the connector's is {intermediate}")
    perceiver = {"hidden_size": conn.llm_dim, "hidden_act": "silu", "resampler_n_latents": o.latents, "resampler_depth": o.layers,
                 "resampler_n_heads": o.heads, "resampler_head_dim": conn.layers[0].attn.head_dim,
                 "num_key_value_heads": conn.layers[0].attn.kv_heads, "rms_norm_eps": o.norm_eps}
    config = Idefics2Config(vision_config=hf_config_dict(model.vision.model.config), perceiver_config=perceiver, text_config=text,
                            image_token_id=model.image_token_id,
                            tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    config.perceiver_config.rms_norm_eps = o.norm_eps  # Idefics2Config copies the LLM's eps over a mismatched perceiver's
    ref = Idefics2ForConditionalGeneration(config).eval()
    state = {f"model.vision_model.{k}": v for k, v in model.vision.model.state_dict().items()}
    state |= {f"model.connector.{their_connector_key(k)}": v for k, v in conn.state_dict().items()}
    state |= {f"model.text_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    load_reference(ref, state, "Idefics2")
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


@torch.no_grad()
def export_idefics2(model, out: str | Path) -> Path:
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    ref = idefics2_reference(model)
    proc, p = model.image_processor, model.config.processor
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": proc.shortest_edge, "longest_edge": proc.longest_edge}, do_image_splitting=proc.do_image_splitting,
        image_mean=list(p.mean), image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=model.tokenizer, image_seq_len=proc.image_seq_len,
                                  chat_template=plain_template(model.tokenizer))
    return save_with_processor(ref, processor, out)


def _reference(model, prompt, ids):
    from transformers import Idefics2ForConditionalGeneration

    return Idefics2ForConditionalGeneration, idefics2_inputs(prompt.images)


def idefics2_inputs(images) -> dict:
    """`pixel_values` (1, views, 3, H, W) and `pixel_attention_mask` for one prompt's images, every
    view top-left on a zero canvas of the largest size, as Idefics2's processor batches them."""
    views = [(v, px) for im in images for v, px in zip(im.views, im.view_pixels())]
    h, w = max(v.size[0] for v, _ in views), max(v.size[1] for v, _ in views)
    pixels = torch.zeros((1, len(views), 3, h, w))
    mask = torch.zeros((1, len(views), h, w), dtype=torch.long)
    for i, (v, px) in enumerate(views):
        pixels[0, i, :, : v.size[0], : v.size[1]] = px
        mask[0, i, : v.size[0], : v.size[1]] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


IDEFICS2 = HFFamily(("idefics2",), "Idefics2 (Idefics2ForConditionalGeneration)", import_idefics2, export_idefics2,
                    lambda model: model.config.processor.name == "idefics2", _reference, specificity=11)
