"""The pieces every family's transformers reference builder shares: transformers' own model of a
vlmkit family, at identical shapes and with the same weights, checks parity (same logits, same
positions, same greedy tokens) and times vlmkit against the reference (`benchmarks/train_step.py`).

Each family folder's `hf.py` holds its own builder (e.g. `families/llava_next/hf.py`,
`families/qwen2_vl/hf.py`), built from these: `vision_feature_settings` (a Hugging Face tower's
feature layer and CLS handling in LLaVA's terms), `text_part`, `load_strict`,
`language_model_state`, `projector_state`, `llava_layout_state`, `finished_reference`.
"""

from __future__ import annotations

import torch
from torch import nn


def vision_feature_settings(model) -> tuple[int, str, bool]:
    """(vision_feature_layer, vision_feature_select_strategy, tie_last_hidden_states) of a model's
    Hugging Face tower, as LLaVA-style configs (LLaVA, LLaVA-NeXT, LLaVA-OneVision) state them."""
    tower = model.vision
    strategy = "default" if tower.has_cls else "full"
    if tower.feature_layer == -1:
        return -1, strategy, True
    return tower.feature_layer, strategy, False


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


def projector_state(conn) -> dict[str, torch.Tensor]:
    """LLaVA's `multi_modal_projector` (linear_1, GELU, linear_2) holding an mlp connector's weights."""
    return {"model.multi_modal_projector.linear_1.weight": conn.fc1.weight, "model.multi_modal_projector.linear_1.bias": conn.fc1.bias,
            "model.multi_modal_projector.linear_2.weight": conn.fc2.weight, "model.multi_modal_projector.linear_2.bias": conn.fc2.bias}


def llava_layout_state(model, projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's weights where LLaVA-style transformers models hold them: its Hugging Face tower
    under `model.vision_tower.`, `projector` (the connector's weights by transformers' names) under
    `model.multi_modal_projector.`, its causal LM's body under `model.language_model.` and head."""
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector.items()}
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    return state


def finished_reference(ref: nn.Module, state: dict[str, torch.Tensor], model) -> nn.Module:
    """`ref` holding `state` (strictly), in the model's dtype and on its device, in eval mode, with
    the generation config of the model's tokenizer."""
    from vlmkit.hf.writing import hf_generation_config

    ref = load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device).eval()
    ref.generation_config = hf_generation_config(model.tokenizer)
    return ref


