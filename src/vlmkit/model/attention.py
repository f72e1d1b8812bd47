"""Attention rules of the language model over a prompt's image and text tokens.

Most VLMs read the whole sequence causally. Some let groups of tokens see each other in both
directions while the rest stays causal; a rule names those groups (`model.attention` in a
recipe), and the model builds the decoder's mask from them on every uncached forward (training,
scoring, and the prefill of generation; decoding steps are causal under every rule):

* `causal`: nothing is bidirectional.
* `image`: the tokens of each image attend to each other (Gemma 3). An image is a run of
  consecutive image-token slots.
* `prefix`: prefix-LM (PaliGemma): the prompt, i.e. every token before the first supervised
  (answer) token of its sample, attends bidirectionally, images included; the answer is causal.
  A prompt without answer (generation) is all prefix.

A rule returns per-position block ids ((B, T), -1 = causal); positions with the same id >= 0
attend to each other. The mask is made by transformers' own mask functions for the LLM's config
(`block_sequence_ids`), so padding, packed rows (positions restarting) and sliding-window layers
are handled as the transformers model handles them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vlmkit.core.types import IGNORE_INDEX
from vlmkit.registry import Registry


@dataclass(frozen=True)
class AttentionRule:
    name: str
    # (input_ids, image_token_id, prefix_mask or None) -> (B, T) block ids, or None (causal).
    blocks: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor | None]
    # How a sliding-window layer combines with the blocks: "or" lets a block see past the window
    # (PaliGemma 2), "and" keeps the window (Gemma 3).
    sliding: str = "or"


ATTENTION_RULES: Registry = Registry("attention rule")


def run_blocks(mask: torch.Tensor) -> torch.Tensor:
    """Each run of consecutive True positions is one block (0, 1, ... per row); -1 elsewhere."""
    previous = F.pad(mask, (1, 0), value=False)[:, :-1]
    group = torch.cumsum((mask & ~previous).int(), dim=1) - 1
    return torch.where(mask, group, torch.full_like(group, -1))


def image_blocks(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Each run of consecutive image-token slots is one block (0, 1, ... per row); -1 elsewhere."""
    return run_blocks(input_ids == image_token_id)


@ATTENTION_RULES.register("causal")
def _causal() -> AttentionRule:
    return AttentionRule("causal", lambda ids, image_id, prefix: None)


@ATTENTION_RULES.register("image")
def _image() -> AttentionRule:
    return AttentionRule("image", lambda ids, image_id, prefix: image_blocks(ids, image_id), sliding="and")


def _prefix_blocks(ids: torch.Tensor, image_id: int, prefix: torch.Tensor | None) -> torch.Tensor:
    if prefix is None:  # no answer given: the whole input is the prompt
        prefix = torch.ones_like(ids, dtype=torch.bool)
    # One block per prompt run: the prompts of the samples of a packed row never share a block.
    return run_blocks(prefix.to(ids.device).bool())


@ATTENTION_RULES.register("prefix")
def _prefix() -> AttentionRule:
    return AttentionRule("prefix", _prefix_blocks, sliding="or")


def attention_rule(name: str) -> AttentionRule:
    return ATTENTION_RULES.build(name)


def _cache_kw(fn) -> str:
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def decoder_mask(rule: AttentionRule, llm_config, input_ids: torch.Tensor, embeds: torch.Tensor,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, image_token_id: int,
                 prefix_mask: torch.Tensor | None = None):
    """The mask the decoder reads on an uncached forward under `rule`: `attention_mask` itself
    for a causal rule, else transformers' mask (a 4D tensor, or a {"full_attention",
    "sliding_attention"} dict for models with sliding-window layers) with the rule's blocks."""
    from transformers.masking_utils import (
        _preprocess_mask_arguments,
        blockwise_overlay,
        create_causal_mask,
        create_sliding_window_causal_mask,
        maybe_pad_block_sequence_ids,
        sliding_window_overlay,
    )

    blocks = rule.blocks(input_ids, image_token_id, prefix_mask)
    if blocks is None:
        return attention_mask
    if position_ids is not None and position_ids.dim() != 2:
        position_ids = None  # M-RoPE (3, B, T) positions: packing is not detected from them
    kwargs = {"config": llm_config, "inputs_embeds": embeds, "attention_mask": attention_mask,
              _cache_kw(create_causal_mask): None, "position_ids": position_ids}
    full = create_causal_mask(**kwargs, block_sequence_ids=blocks.to(embeds.device))
    layer_types = getattr(llm_config, "layer_types", None) or []
    if getattr(llm_config, "sliding_window", None) is None or "sliding_attention" not in layer_types:
        return full
    if rule.sliding == "or":
        sliding = create_sliding_window_causal_mask(**kwargs, block_sequence_ids=blocks.to(embeds.device))
    else:
        early_exit, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(**kwargs, layer_idx=0)
        padded = blocks.to(embeds.device) if early_exit else maybe_pad_block_sequence_ids(
            blocks.to(embeds.device), attention_mask, kv_length, kv_offset)
        sliding = create_causal_mask(**kwargs, or_mask_function=blockwise_overlay(padded),
                                     and_mask_function=sliding_window_overlay(llm_config.sliding_window))
    return {"full_attention": full, "sliding_attention": sliding}


def prompt_mask(labels: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """(B, T) True on each sample's prompt: its tokens before its first supervised label
    (`labels` != -100); padding (segment -1) is False. Packed rows restart per sample."""
    supervised = labels != IGNORE_INDEX
    if segments is None:
        return torch.cumsum(supervised.int(), dim=1) == 0
    out = torch.zeros_like(supervised)
    for b in range(labels.shape[0]):
        for s in segments[b].unique().tolist():
            if s < 0:
                continue
            idx = (segments[b] == s).nonzero().squeeze(1)
            out[b, idx] = torch.cumsum(supervised[b, idx].int(), dim=0) == 0
    return out
