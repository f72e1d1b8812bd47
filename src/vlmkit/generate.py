"""Batched generation with a KV cache: left-padded prompts, greedy or sampled decoding.

Left padding puts every prompt's last token in the final column, so one forward step decodes
the whole batch; position ids count real tokens only and the attention mask hides the pads, so
each row computes what it would compute alone (batched greedy output equals one-by-one output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vlmkit.data.collate import collate
from vlmkit.model import fast_decode
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
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop_ids = sorted({i for i in [tok.eos_token_id, *extra_stop_ids(tok)] if i is not None})
    B = len(prompts)
    limits = list(limits) if limits is not None else [cfg.max_new_tokens] * B
    if len(limits) != B:
        raise ValueError(f"{len(limits)} limits for {B} prompts")
    device = model.device  # a property that walks the parameters: read it once
    real_B = B
    # The lean path decodes causally from the start; a bidirectional prompt rule needs the model's prefill.
    causal = getattr(getattr(model, "attention_rule", None), "name", "causal") == "causal"
    lean_path = causal and fast_decode.supports(model.llm)  # walks every module: once per call
    if cfg.compile and device.type in PAD_BATCH_FOR_GRAPHS and lean_path:
        # A compiled step (a CUDA graph) exists per batch size; rounding batches up to a power of
        # two bounds the graphs to log2(max_batch). The extra rows repeat the first prompt with no
        # tokens to produce, so they are done from the start and never reported.
        B = 1 << (real_B - 1).bit_length()
        prompts = list(prompts) + [prompts[0]] * (B - real_B)
        limits = limits + [0] * (B - real_B)
        if image_features is not None:
            image_features = list(image_features) + [image_features[0]] * (B - real_B)
    batch = collate(prompts, pad_id, left_pad=True, features=image_features).to(device)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    from vlmkit.model.vlm import lm_head

    head = lm_head(model.llm)
    # Generated tokens are text, whatever their ids: a model may emit its own image or video slot
    # token, which is embedded from the LM's table like any other token (as transformers'
    # generate does), never treated as a slot waiting for an image.
    token_embedding = model.llm.get_input_embeddings()
    mask = batch.attention_mask
    positions = batch.position_ids
    steps = max(limits, default=0)
    if lean_path:
        # Llama-family decoders run on decode-layout weights; the images are fused by the model's
        # own strategy, exactly as in `forward`.
        embeds = model.inputs_embeds(batch.input_ids, batch.images, batch.image_features)
        full_mask = torch.cat([mask, torch.ones((B, steps), dtype=mask.dtype, device=mask.device)], dim=1)
        lean = fast_decode.LeanDecoder(model.llm, B, full_mask.shape[1], full_mask, embeds.dtype, embeds.device, compile=cfg.compile)
        logits = lean.step_logits(embeds, positions)

        def step_logits(token, step_positions):
            return lean.step_logits(token_embedding(token.unsqueeze(-1)), step_positions)
    else:
        state = {"mask": mask, "cache": DynamicCache()}

        def forward_last(ids, step_positions):
            out = model(ids, state["mask"], position_ids=step_positions, past_key_values=state["cache"], use_cache=True,
                        inputs_embeds=token_embedding(ids))
            state["cache"] = out.past_key_values
            return head(out.hidden_states[:, -1])

        # The cache object is empty before the prompt: the fusion strategy sees a fresh prompt.
        logits = model(batch.input_ids, mask, images=batch.images, image_features=batch.image_features,
                       position_ids=positions, past_key_values=None, use_cache=True)
        state["cache"] = logits.past_key_values
        logits = head(logits.hidden_states[:, -1])

        def step_logits(token, step_positions):
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((B, 1))], dim=1)
            return forward_last(token.unsqueeze(-1), step_positions)

    done = [limit <= 0 for limit in limits]
    counts = [0] * B
    # The prompt ends in text, whose M-RoPE positions are equal on all axes: the next position is
    # the last one plus 1 on each (this is the decode delta of Qwen2-VL's get_rope_index).
    next_pos = positions[..., -1:] + 1
    for _ in range(steps):
        if cancelled is not None:
            for i in range(real_B):
                done[i] = done[i] or cancelled(i)
        if all(done):
            return
        token = _pick(logits, cfg, generator)
        # One host transfer per step; per-element tensor reads cost a sync each.
        picked = token.tolist()
        tokens: list[int | None] = [None] * B
        finished: list[str | None] = [None] * B
        for i, t in enumerate(picked):
            if done[i]:
                picked[i] = pad_id
            elif t in stop_ids:
                done[i], finished[i], picked[i] = True, "stop", pad_id
            else:
                tokens[i] = t
                counts[i] += 1
                if counts[i] >= limits[i]:
                    done[i], finished[i] = True, "length"
        yield Step(tokens[:real_B], finished[:real_B])
        if all(done):
            return
        token = torch.tensor(picked, device=device)
        logits = step_logits(token, next_pos)
        next_pos = next_pos + 1


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
