"""Cohere and Cohere2 decoders (Aya Vision's LLM) as vlmkit language models.

Their causal LM's forward multiplies the LM head's output by `config.logit_scale`. vlmkit never
calls that forward: it runs the decoder and applies the LLM's output layer itself
(`vlmkit.model.vlm.lm_head`), which knows final soft-capping but not a logit scale. The
`cohere-hf` builder loads the folder as the `hf` one does and moves the scale into the output
layer (`LogitScaledHead`, the same weight, tied or not), leaving the causal LM's own multiplier
at 1, so its forward and vlmkit's head give the same logits and `config.json` keeps the folder's
scale (saving and export write what was read).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import LLMConfig
from vlmkit.model.language import build_hf_llm
from vlmkit.registry import LANGUAGE_MODELS


class LogitScaledHead(nn.Linear):
    """An LM head whose output is multiplied by `scale` (Cohere's `logit_scale`)."""

    def __init__(self, head: nn.Linear, scale: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias
        self.scale = float(scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


def scale_logits_in_head(causal: nn.Module) -> nn.Module:
    """Move a Cohere causal LM's `logit_scale` into its output layer (in place; returns it)."""
    scale = float(causal.config.logit_scale)
    causal.lm_head = LogitScaledHead(causal.lm_head, scale)
    causal.logit_scale = 1.0  # the forward's own multiplier: the head applies the scale now
    return causal


@LANGUAGE_MODELS.register("cohere-hf")
def build_cohere_llm(cfg: LLMConfig, pretrained: bool = True):
    """A Cohere / Cohere2 causal LM from a local folder (as `hf`), its logit scale in its output layer."""
    causal, tokenizer = build_hf_llm(cfg, pretrained)
    if causal.config.model_type not in ("cohere", "cohere2"):
        raise ValueError(f"cohere-hf: {cfg.path} holds a {causal.config.model_type!r} model, not cohere / cohere2; use 'hf'")
    return scale_logits_in_head(causal), tokenizer
