"""transformers' own models of a vlmkit family, at identical shapes and with the same weights.

Used to check parity (same logits, same positions, same greedy tokens) and to time vlmkit against
the reference at identical shapes (`benchmarks/train_step.py`). Each builder takes a built vlmkit
model and returns the transformers model holding its weights:

* `qwen2_vl`: `Qwen2VLForConditionalGeneration` (its ViT, PatchMerger = our pre-norm pixel
  shuffle, M-RoPE decoder) for a model with the `qwen2-vit` tower.

The pieces every family's builder shares live here too: `vision_feature_settings` (a Hugging Face
tower's feature layer and CLS handling in LLaVA's terms), `text_part`, `load_strict`,
`language_model_state`.
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


def qwen2_vl(model) -> nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tower = model.vision.model
    conn = model.connector
    if conn.options.norm != "pre" or conn.options.projector != "mlp" or conn.factor != tower.config.spatial_merge_size:
        raise ValueError("Qwen2-VL's PatchMerger is a pre-norm 2-layer pixel shuffle over the merge window")
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "embed_dim", "num_heads", "mlp_ratio", "patch_size", "temporal_patch_size", "spatial_merge_size",
        "in_channels", "hidden_act")}
    text, text_state = text_part(model)
    config = Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": conn.llm_dim},
                           image_token_id=model.image_token_id, video_token_id=model.image_token_id)
    ref = Qwen2VLForConditionalGeneration(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    state |= {"model.visual.merger.ln_q.weight": conn.norm.weight, "model.visual.merger.ln_q.bias": conn.norm.bias,
              "model.visual.merger.mlp.0.weight": conn.proj[0].weight, "model.visual.merger.mlp.0.bias": conn.proj[0].bias,
              "model.visual.merger.mlp.2.weight": conn.proj[2].weight, "model.visual.merger.mlp.2.bias": conn.proj[2].bias}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)


def language_model_state(text_state: dict) -> dict:
    head = text_state.pop("__head__")
    return {f"model.language_model.{k}": v for k, v in text_state.items()} | {"lm_head.weight": head}


def qwen2_5_vl(model) -> nn.Module:
    """`Qwen2_5_VLForConditionalGeneration` for a model with the `qwen2.5-vit` tower (its
    PatchMerger = our pixel shuffle with an RMSNorm before the merge)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tower = model.vision.model
    conn = model.connector
    if conn.options.norm != "pre" or conn.options.norm_kind != "rmsnorm" or conn.factor != tower.config.spatial_merge_size:
        raise ValueError("Qwen2.5-VL's PatchMerger is a pre-RMSNorm 2-layer pixel shuffle over the merge window")
    vision = {k: v for k, v in tower.config.to_dict().items() if k in (
        "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
        "temporal_patch_size", "tokens_per_second", "window_size", "fullatt_block_indexes", "rope_parameters")}
    text, text_state = text_part(model)
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "out_hidden_size": conn.llm_dim},
                              image_token_id=model.image_token_id, video_token_id=model.image_token_id)
    ref = Qwen2_5_VLForConditionalGeneration(config)
    state = {f"model.visual.{k}": v for k, v in tower.state_dict().items()}
    state |= {"model.visual.merger.ln_q.weight": conn.norm.weight,
              "model.visual.merger.mlp.0.weight": conn.proj[0].weight, "model.visual.merger.mlp.0.bias": conn.proj[0].bias,
              "model.visual.merger.mlp.2.weight": conn.proj[2].weight, "model.visual.merger.mlp.2.bias": conn.proj[2].bias}
    state |= language_model_state(text_state)
    return load_strict(ref.to(next(model.parameters()).dtype), state).to(model.device)
