"""DeepStack: visual features from several vision-tower levels, each added to the decoder's
hidden states at the image slots after one of its first layers (Qwen3-VL).

A connector that declares `feature_levels = L` returns each visual token as 1 + L blocks of the
LLM width: the first fills the token's slot in the input (ordinary prefix fusion), block k + 1
is added to the hidden state at that slot after decoder layer k. The additions are forward hooks
on the decoder's layers, so any decoder with a layer list takes them; they apply to the forward
that filled the slots only (decoding steps carry no images).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.model.language import decoder_layers


class LevelInjection:
    """Adds the pending levels of the current forward after the first `levels` decoder layers."""

    def __init__(self, llm: nn.Module, levels: int):
        layers = decoder_layers(llm)
        if levels > len(layers):
            raise ValueError(f"DeepStack: {levels} feature levels need as many decoder layers; the LLM has {len(layers)}")
        self.levels = levels
        self._pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.handles = [layer.register_forward_hook(self._hook(k)) for k, layer in enumerate(layers[:levels])]

    def split(self, tokens: torch.Tensor, width: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(n, width * (1 + levels)) tokens -> the slot embeddings and one (n, width) tensor per level."""
        if tokens.shape[-1] != width * (1 + self.levels):
            raise ValueError(f"DeepStack: visual tokens of width {tokens.shape[-1]}, expected {1 + self.levels} blocks of {width}")
        parts = tokens.split(width, dim=-1)
        return parts[0], list(parts[1:])

    def set(self, slots: torch.Tensor | None, levels: list[torch.Tensor] | None) -> None:
        """The slot mask (B, T) and the level tokens (in slot order) of the next forward; None: none."""
        self._pending = None if slots is None or not levels else (slots, levels)

    def _hook(self, k: int):
        def add(module, args, output):
            if self._pending is None:
                return None
            slots, levels = self._pending
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[:2] != slots.shape:  # a forward these slots do not belong to
                return None
            level = levels[k].to(hidden.device, hidden.dtype)
            added = hidden.masked_scatter(slots.unsqueeze(-1), hidden[slots] + level)
            return (added, *output[1:]) if isinstance(output, tuple) else added
        return add
