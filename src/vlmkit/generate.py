"""Batched generation with a KV cache: left-padded prompts, greedy or sampled decoding.

Left padding puts every prompt's last token in the final column, so one forward step decodes
the whole batch; position ids count real tokens only and the attention mask hides the pads, so
each row computes what it would compute alone (batched greedy output equals one-by-one output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vlmkit.data.collate import collate
from vlmkit.model import fast_decode
from vlmkit.model.vlm import lm_head
from vlmkit.processing.prompt import EncodedSample


# Devices where compiled decoding pads batches to a power of two (graphs are per batch size;
# on a CPU the padded rows would cost more than the graph saves).
PAD_BATCH_FOR_GRAPHS = {"cuda"}


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Compile the single-token decode step (torch.compile; a CUDA graph on GPUs). Pays a compile
    # on first use per batch size and length bucket; on a CPU its gain is within run-to-run noise
    # (docs/serving.md), so it is meant for GPUs.
    compile: bool = False


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(cfg.temperature, 1e-5)
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Step:
    """One decoding step of a batch: the token each row produced (None once a row has ended),
    and, on the step a row ends, why: "stop" (an end-of-turn token) or "length"."""

    tokens: list[int | None]
    finished: list[str | None]


@torch.inference_mode()
def generate(model, prompts: list[EncodedSample], cfg: GenerationConfig = GenerationConfig(), image_features: list[torch.Tensor] | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, stopping at EOS)."""
    produced: list[list[int]] = [[] for _ in prompts]
    for step in generate_steps(model, prompts, cfg, image_features):
        for i, t in enumerate(step.tokens):
            if t is not None:
                produced[i].append(t)
    return produced


def generate_steps(
    model,
    prompts: list[EncodedSample],
    cfg: GenerationConfig = GenerationConfig(),
    image_features: list[torch.Tensor] | None = None,
    max_new_tokens: list[int] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[Step]:
    """Decode step by step, for streaming and for a server batching requests with their own
    limits: `max_new_tokens` per row (default `cfg.max_new_tokens` for all), and `cancelled(i)`
    polled every step so a row whose client went away stops costing anything but its slot."""
    with torch.inference_mode():
        yield from _generate_steps(model, prompts, cfg, image_features, max_new_tokens, cancelled)


def _generate_steps(model, prompts, cfg, image_features, limits, cancelled) -> Iterator[Step]:
    """Prefill the left-padded batch, then one decode step per token until every row has ended."""
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop_ids = sorted({i for i in [tok.eos_token_id, *extra_stop_ids(tok)] if i is not None})
    real_B = len(prompts)
    limits = list(limits) if limits is not None else [cfg.max_new_tokens] * real_B
    if len(limits) != real_B:
        raise ValueError(f"{len(limits)} limits for {real_B} prompts")
    device = model.device  # a property that walks the parameters: read it once
    lean_path = _can_decode_lean(model)
    if cfg.compile and device.type in PAD_BATCH_FOR_GRAPHS and lean_path:
        prompts, limits, image_features = _pad_batch_for_graphs(prompts, limits, image_features)
    batch = collate(prompts, pad_id, left_pad=True, features=image_features).to(device)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    steps = max(limits, default=0)
    prefill = _prefill_lean if lean_path else _prefill_with_model
    logits, step_logits = prefill(model, batch, steps, cfg)

    rows = _Rows(limits, stop_ids, pad_id, real_B)
    # The prompt ends in text, whose M-RoPE positions are equal on all axes: the next position is
    # the last one plus 1 on each (this is the decode delta of Qwen2-VL's get_rope_index).
    next_pos = batch.position_ids[..., -1:] + 1
    for _ in range(steps):
        if cancelled is not None:
            rows.cancel(cancelled)
        if rows.all_done():
            return
        # One host transfer per step; per-element tensor reads cost a sync each.
        step, fed_back = rows.advance(_pick(logits, cfg, generator).tolist())
        yield step
        if rows.all_done():
            return
        logits = step_logits(torch.tensor(fed_back, device=device), next_pos)
        next_pos = next_pos + 1


# Logits (B, V) for the next position, given the token (B,) each row takes there and its positions.
StepLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _can_decode_lean(model) -> bool:
    """Whether `fast_decode` can run this model's decoder. It decodes causally from the start; a
    bidirectional prompt rule needs the model's own prefill."""
    causal = model.attention_rule.name == "causal"
    return causal and fast_decode.supports(model.llm)  # walks every module: once per call


def _pad_batch_for_graphs(prompts, limits, image_features):
    """A compiled step (a CUDA graph) exists per batch size; rounding batches up to a power of two
    bounds the graphs to log2(max_batch). The extra rows repeat the first prompt with no tokens to
    produce, so they are done from the start and never reported."""
    real_B = len(prompts)
    extra = (1 << (real_B - 1).bit_length()) - real_B
    prompts = list(prompts) + [prompts[0]] * extra
    limits = limits + [0] * extra
    if image_features is not None:
        image_features = list(image_features) + [image_features[0]] * extra
    return prompts, limits, image_features


# Generated tokens are text, whatever their ids: a model may emit its own image or video slot
# token, which is embedded from the LM's table like any other token (as transformers' generate
# does), never treated as a slot waiting for an image. Both paths below embed them so.

def _prefill_lean(model, batch, steps: int, cfg: GenerationConfig) -> tuple[torch.Tensor, StepLogits]:
    """Run the prompt on `fast_decode`'s decoder: Llama-family decoders on decode-layout weights,
    with the images fused by the model's own strategy, exactly as in `forward`."""
    token_embedding = model.llm.get_input_embeddings()
    embeds = model.inputs_embeds(batch.input_ids, batch.visuals)
    mask = batch.attention_mask
    B = mask.shape[0]
    full_mask = torch.cat([mask, torch.ones((B, steps), dtype=mask.dtype, device=mask.device)], dim=1)
    # M-RoPE positions may run past the sequence length (a video's frames are numbered by time).
    max_position = int(batch.position_ids.max()) + steps if batch.position_ids.dim() == 3 else None
    lean = fast_decode.LeanDecoder(model.llm, B, full_mask.shape[1], full_mask, embeds.dtype, embeds.device, compile=cfg.compile,
                                   max_position=max_position)
    logits = lean.step_logits(embeds, batch.position_ids)

    def step_logits(token, positions):
        return lean.step_logits(token_embedding(token.unsqueeze(-1)), positions)

    return logits, step_logits


def _prefill_with_model(model, batch, steps: int, cfg: GenerationConfig) -> tuple[torch.Tensor, StepLogits]:
    """Run the prompt through the model's own forward (any fusion, any attention rule) and decode
    on transformers' dynamic KV cache."""
    head = lm_head(model.llm)
    token_embedding = model.llm.get_input_embeddings()
    # The cache object is empty before the prompt: the fusion strategy sees a fresh prompt.
    out = model(batch.input_ids, batch.visuals, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                past_key_values=None, use_cache=True)
    state = {"mask": batch.attention_mask, "cache": out.past_key_values}

    def step_logits(token, positions):
        mask = state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((token.shape[0], 1))], dim=1)
        ids = token.unsqueeze(-1)
        out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=state["cache"], use_cache=True,
                    inputs_embeds=token_embedding(ids))
        state["cache"] = out.past_key_values
        return head(out.hidden_states[:, -1])

    return head(out.hidden_states[:, -1]), step_logits


class _Rows:
    """Per-row bookkeeping of one decoding call: which rows have ended and how many tokens each
    has produced. Only the first `reported` rows are the caller's (the rest pad the batch)."""

    def __init__(self, limits: list[int], stop_ids: list[int], pad_id: int, reported: int):
        self.limits, self.stop_ids, self.pad_id, self.reported = limits, stop_ids, pad_id, reported
        self.done = [limit <= 0 for limit in limits]
        self.counts = [0] * len(limits)

    def all_done(self) -> bool:
        return all(self.done)

    def cancel(self, cancelled: Callable[[int], bool]) -> None:
        """Poll `cancelled` for the caller's rows still running."""
        for i in range(self.reported):
            self.done[i] = self.done[i] or cancelled(i)

    def advance(self, picked: list[int]) -> tuple[Step, list[int]]:
        """Record the tokens picked for one step: the step to report, and the tokens to feed
        back (the pad token for rows that have ended, whose outputs are never used)."""
        fed_back = list(picked)
        tokens: list[int | None] = [None] * len(picked)
        finished: list[str | None] = [None] * len(picked)
        for i, t in enumerate(picked):
            if self.done[i]:
                fed_back[i] = self.pad_id
            elif t in self.stop_ids:
                self.done[i], finished[i], fed_back[i] = True, "stop", self.pad_id
            else:
                tokens[i] = t
                self.counts[i] += 1
                if self.counts[i] >= self.limits[i]:
                    self.done[i], finished[i] = True, "length"
        return Step(tokens[: self.reported], finished[: self.reported]), fed_back


def extra_stop_ids(tok) -> list[int]:
    # ChatML models end a turn with <|im_end|>, which is not always their eos token.
    ids = []
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.append(tid)
    return ids


def decode(model, token_lists: list[list[int]]) -> list[str]:
    return [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in token_lists]
