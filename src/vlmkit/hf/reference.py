"""transformers' own models of a vlmkit family, at identical shapes and with the same weights.

Used to check parity (same logits, same positions, same greedy tokens) and to time vlmkit against
the reference at identical shapes (`benchmarks/train_step.py`). Each builder takes a built vlmkit
model and returns the transformers model holding its weights:

* `llava_next`: `LlavaNextForConditionalGeneration` (SigLIP/CLIP tower, 2-layer GELU projector,
  `image_newline`, AnyRes pinpoints and unpadding) for a model with the `anyres` processor.

A family folder holds its own (`families/qwen2_vl/hf.py`: Qwen2-VL and Qwen2.5-VL), built from
the shared pieces here (`text_part`, `language_model_state`, `load_strict`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.hf.families.llava import vision_feature_settings


def load_strict(ref: nn.Module, state: dict[str, torch.Tensor], allowed_missing=("rotary", "inv_freq")) -> nn.Module:
    missing, unexpected = ref.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not any(a in m for a in allowed_missing)]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto {type(ref).__name__}: missing {missing}, unexpected {unexpected}")
    return ref


def text_part(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """The LLM's config and weights, with the vocabulary grown to hold the image token: the
    reference looks every input id up before replacing image slots, while vlmkit never looks
    image ids up (their rows are zero here and never read). Compare logits over the first
    `model.vocab_size` columns."""
    text = model.llm.config.to_dict()
    state = {k: v for k, v in model.llm.model.state_dict().items()}
    head = model.llm.get_output_embeddings().weight
    rows = max(model.vocab_size, model.image_token_id + 1)
    if rows > model.vocab_size:
        text["vocab_size"] = rows
        grow = lambda w: torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])  # noqa: E731
        state["embed_tokens.weight"] = grow(state["embed_tokens.weight"])
        head = grow(head)
    return text, state | {"__head__": head}


def language_model_state(text_state: dict) -> dict:
    head = text_state.pop("__head__")
    return {f"model.language_model.{k}": v for k, v in text_state.items()} | {"lm_head.weight": head}


def llava_next(model) -> nn.Module:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    proc = model.image_processor
    tower = model.vision.model
    conn = model.connector
    if model.config.processor.name != "anyres" or not getattr(conn, "image_newline", None) is not None:
        raise ValueError("LLaVA-NeXT needs the anyres processor with unpadding and newlines")
    layer, strategy, tie_last = vision_feature_settings(model)
    text, text_state = text_part(model)
    config = LlavaNextConfig(
        vision_config={**tower.config.to_dict(), "tie_last_hidden_states": tie_last},
        text_config=text,
        image_token_index=model.image_token_id, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints],
        tie_word_embeddings=model.llm.config.tie_word_embeddings,
    )
    ref = LlavaNextForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state |= {"model.multi_modal_projector.linear_1.weight": conn.fc1.weight, "model.multi_modal_projector.linear_1.bias": conn.fc1.bias,
              "model.multi_modal_projector.linear_2.weight": conn.fc2.weight, "model.multi_modal_projector.linear_2.bias": conn.fc2.bias,
              "model.image_newline": conn.image_newline}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


def llava_next_inputs(encoded: list, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `pixel_values` (B, max views, 3, S, S) and `image_sizes`
    for LlavaNext from vlmkit-encoded samples with one image each (right-padded)."""
    longest = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = e.input_ids
        mask[i, : len(e.input_ids)] = 1
    views = max(e.images[0].pixel_values.shape[0] for e in encoded)
    first = encoded[0].images[0].pixel_values
    pixels = first.new_zeros((len(encoded), views, *first.shape[1:]))
    for i, e in enumerate(encoded):
        pv = e.images[0].pixel_values
        pixels[i, : pv.shape[0]] = pv
    sizes = torch.tensor([list(e.images[0].image_size) for e in encoded])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}
