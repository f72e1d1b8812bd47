"""Tiny VLM configs and a toy task shared by the connector and cross-attention tests."""

from __future__ import annotations

import torch

from vlmkit.config import ModelConfig
from vlmkit.model.vlm import IGNORE_INDEX, VisionLanguageModel
from vlmkit.processing.base import VisualBatch

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 4, "vision_use_head": False}
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

# Recipe `model` sections of a tiny random VLM with a 4x4 patch grid at 32 px (no connector set).
TINY_SECTIONS = {
    "vision": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
    "llm": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "num_key_value_heads": 1}},
    "processor": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}

# name -> (connector options, vision override, fusion). Grid is 8x8 = 64 patches.
FAMILIES = {
    "linear": ({}, None, "prefix"),
    "mlp": ({}, None, "prefix"),
    "pixel-shuffle": ({"ratio": 0.5}, None, "prefix"),
    "pooling": ({"kernel": 2}, None, "prefix"),
    "qformer": ({"num_queries": 4, "hidden_size": 16, "layers": 2, "heads": 2, "intermediate_size": 32}, None, "prefix"),
    "perceiver": ({"latents": 4, "layers": 1, "heads": 2, "head_dim": 8}, None, "prefix"),
    "native": ({"projector": "mlp"}, {"name": "rope-vit", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 4}}, "prefix"),
    "patch-embed": ({}, {"name": "patchify", "config": {"patch_size": 4}}, "prefix"),
    "cross-attn": ({"cross_attention": {"every": 1, "heads": 2}}, None, "cross-attention"),
}


def tiny_config(family: str) -> ModelConfig:
    options, vision, fusion = FAMILIES[family]
    connector = "mlp" if family == "cross-attn" else family
    vision = vision or {"name": "hf-random", "model_type": "siglip_vision_model", "config": TINY_VISION}
    return ModelConfig.model_validate(
        {
            "vision": vision,
            "connector": {"name": connector, "options": options},
            "llm": {"name": "hf-random", "model_type": "llama", "config": TINY_LLM},
            "processor": {"image_size": 32},
            "fusion": fusion,
        }
    )


def tiny_model(family: str, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(tiny_config(family), pretrained=False)


def toy_batch(model: VisionLanguageModel, n_classes: int = 3, seed: int = 0):
    """Each class is one fixed noisy image of its own colour; the answer is its class letter.
    (Global colour keeps the task learnable in seconds even through a pooled bottleneck.)"""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(n_classes, 3, 1, 1, generator=g)
    pixels = colours + 0.3 * torch.randn(n_classes, 3, 32, 32, generator=g)
    tok = model.tokenizer
    prompt = tok.encode("Q:", add_special_tokens=False)
    rows, labels = [], []
    for c in range(n_classes):
        answer = tok.encode("ABCDEFGH"[c], add_special_tokens=False)
        ids = [model.image_token_id] * model.tokens_per_image + prompt + answer
        rows.append(ids)
        labels.append([IGNORE_INDEX] * (len(ids) - len(answer)) + answer)
    return torch.tensor(rows), torch.tensor(labels), pixels


def answer_accuracy(model: VisionLanguageModel, ids, labels, pixels) -> float:
    with torch.no_grad():
        logits = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
    pred = logits[:, -2].argmax(-1)
    return float((pred == labels[:, -1]).float().mean())
