"""GRPO's generation batch: each prompt's G sampled completions, scored and made into a batch.

A record's prompt is its encoded turns up to its last assistant turn (the tokens the model sees
before that turn's text), and that turn's text is the reference the reward compares with. The
completions are sampled with the batched KV-cache decoder, appended to their prompt with the
turn's end token when the model ended the turn, and collated into one right-padded training batch
whose labels are the completion tokens, so the log-probs of the loss are read as for any other
supervised token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vlmkit.core.types import IGNORE_INDEX
from vlmkit.data.collate import Batch, collate
from vlmkit.generate import GenerationConfig, extra_stop_ids, generate_steps
from vlmkit.model.vlm import lm_head
from vlmkit.processing.prompt import EncodedSample
from vlmkit.train.losses import decoder_hidden, group_advantages, token_logps
from vlmkit.train.rewards import Reward


@dataclass
class Rollout:
    """One micro-batch's completions, ready for the loss (all on the model's device)."""

    batch: Batch  # prompt + completion per completion, prompts' G completions consecutive
    mask: torch.Tensor  # (N, T) float: 1 on each completion's tokens, left-aligned
    advantages: torch.Tensor  # (N,)
    old_logps: torch.Tensor | None  # (N, T) under the policy that sampled them (None: the same step's, detached)
    ref_logps: torch.Tensor | None  # (N, T) under the frozen reference (None: beta = 0)
    stats: dict[str, float]  # reward sums and counts, added to the step's sums by the loss


def split_record(sample: EncodedSample, tokenizer) -> tuple[EncodedSample, str, int]:
    """(the prompt, the reference text, the turn's end token) of an encoded training record."""
    supervised = (sample.labels != IGNORE_INDEX).nonzero().flatten()
    gaps = (supervised[1:] - supervised[:-1] > 1).nonzero().flatten()
    first = int(supervised[int(gaps[-1]) + 1] if gaps.numel() else supervised[0])
    answer = sample.input_ids[first: int(supervised[-1]) + 1].tolist()
    stops = set(extra_stop_ids(tokenizer)) | {tokenizer.eos_token_id}
    end = next((t for t in answer if t in stops), tokenizer.eos_token_id)
    positions = sample.position_ids[:, :first] if sample.position_ids is not None else None
    prompt = dataclasses.replace(sample, input_ids=sample.input_ids[:first], labels=torch.full((first,), IGNORE_INDEX),
                                 position_ids=positions)
    return prompt, tokenizer.decode(answer, skip_special_tokens=True).strip(), end


def with_completion(prompt: EncodedSample, tokens: list[int]) -> EncodedSample:
    """The prompt followed by `tokens`, which are its supervised labels."""
    ids = torch.cat([prompt.input_ids, torch.tensor(tokens, dtype=torch.long)])
    labels = torch.cat([prompt.labels, torch.tensor(tokens, dtype=torch.long)])
    positions = None
    if prompt.position_ids is not None:
        # Text after the prompt advances every M-RoPE axis by one, as in decoding.
        steps = torch.arange(1, len(tokens) + 1, dtype=prompt.position_ids.dtype)
        positions = torch.cat([prompt.position_ids, prompt.position_ids[:, -1:] + steps], dim=1)
    return dataclasses.replace(prompt, input_ids=ids, labels=labels, position_ids=positions)


def sample_completions(model, prompts: list[EncodedSample], ends: list[int], cfg: GenerationConfig) -> list[list[int]]:
    """Each prompt's sampled tokens, with its end token where the model ended the turn."""
    tokens: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for step in generate_steps(model, prompts, cfg):
            for i, (t, why) in enumerate(zip(step.tokens, step.finished)):
                if t is not None:
                    tokens[i].append(t)
                if why == "stop":
                    tokens[i].append(ends[i])
    finally:
        model.train(was_training)
    return tokens


@torch.no_grad()
def completion_logps(model, batch: Batch) -> torch.Tensor:
    """Per-token log-probs of the batch's completions under `model` in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        return token_logps(decoder_hidden(model, batch), batch, lm_head(model.llm))
    finally:
        model.train(was_training)


def roll_out(model, samples: list[EncodedSample], reward: Reward, grpo, seed: int, *, reference_model=None,
             keep_old: bool = False) -> Rollout:
    """Sample `grpo.num_generations` completions of each record's prompt, score them and build
    the training batch. `seed`: the sampling generator's seed (drawn from the training RNG, so a
    resumed run samples the same completions). `keep_old`: score the completions under the policy
    as it is now, for the later updates of the same batch."""
    tok, G = model.tokenizer, grpo.num_generations
    split = [split_record(s, tok) for s in samples]
    prompts = [p for p, _, _ in split for _ in range(G)]
    ends = [e for _, _, e in split for _ in range(G)]
    refs = [r for _, r, _ in split for _ in range(G)]
    cfg = GenerationConfig(max_new_tokens=grpo.max_new_tokens, do_sample=True, temperature=grpo.temperature,
                           top_p=grpo.top_p, seed=seed)
    tokens = sample_completions(model, prompts, ends, cfg)
    texts = [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
    prompt_texts = [tok.decode(p.input_ids.tolist(), skip_special_tokens=True) for p in prompts]
    totals, per_term = reward(texts, refs, prompt_texts)
    rewards = torch.tensor(totals, dtype=torch.float32)
    advantages, zero_spread = group_advantages(rewards, G, grpo.scale_rewards)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = model.device
    batch = collate([with_completion(p, t) for p, t in zip(prompts, tokens)], pad_id).to(device)
    lengths = torch.tensor([len(t) for t in tokens])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float().to(device)
    stats = {"reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()), "completions": float(len(tokens)),
             "completion_tokens": float(lengths.sum()), "zero_std_groups": float(zero_spread.view(-1, G)[:, 0].sum()),
             "groups": float(len(samples))}
    for name, values in per_term.items():
        v = torch.tensor(values)
        stats[f"reward:{name}"], stats[f"reward_sq:{name}"] = float(v.sum()), float((v ** 2).sum())
    return Rollout(batch, mask, advantages.to(device), completion_logps(model, batch) if keep_old else None,
                   completion_logps(reference_model, batch) if reference_model is not None else None, stats)
