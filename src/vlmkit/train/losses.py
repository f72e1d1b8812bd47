"""Losses over a batch's supervised positions: SFT (per token or per sample) and DPO.

The LM head runs only on positions with a target, in chunks (most positions of a VLM sample
are image and prompt tokens; a full tokens x vocab logit tensor is the largest activation).
Log-probs are summed per sample through `Batch.segments`, which is what makes per-sample
reduction, DPO sequence log-probs and packing all the same computation.

The losses return *sums*; the loop divides by the whole optimizer step's count (all
micro-batches, all ranks), so gradient accumulation and data parallelism give exactly the
loss a single big batch would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmkit.data.collate import Batch
from vlmkit.core.types import IGNORE_INDEX
from vlmkit.model.loss import next_token_loss  # noqa: F401  (re-exported)


def decoder_hidden(model, batch: Batch) -> torch.Tensor:
    """Final hidden states of the LLM for `batch`, through the model's own forward (so DDP /
    FSDP wrappers and both fusion strategies stay on their normal path)."""
    return model(
        batch.input_ids, batch.visuals,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **_prefix(model, batch),
    ).hidden_states


def decoder_rows(model, batch: Batch) -> torch.Tensor:
    """`decoder_hidden(model, batch)[batch.targets != IGNORE_INDEX]`: the final hidden states at
    the positions with a target, as rows; the model runs only the work they depend on where its
    decoder allows (`model.lean_train`)."""
    return model(
        batch.input_ids, batch.visuals,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        read=batch.targets != IGNORE_INDEX,
        **_prefix(model, batch),
    ).hidden_states


def _prefix(model, batch: Batch) -> dict:
    """The prompt mask, for models whose attention rule reads it (prefix-LM)."""
    inner = getattr(model, "module", model)  # DDP
    rule = inner.attention_rule.name
    return {"prefix_mask": batch.prompt_mask} if rule == "prefix" else {}


def sequence_logps(hidden: torch.Tensor, batch: Batch, head, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs, number of targets) per sample of `batch`, in `batch.ids` order.
    `hidden`: (B, T, C) final hidden states, or their rows at the targets (`decoder_rows`)."""
    keep = batch.targets != IGNORE_INDEX
    rows = hidden[keep] if hidden.ndim == 3 else hidden
    wanted = batch.targets[keep]
    owner = batch.segments[keep]
    n = len(batch.ids)
    sums = hidden.new_zeros(n, dtype=torch.float32)
    counts = torch.bincount(owner, minlength=n)
    for start in range(0, rows.shape[0], chunk):
        logits = head(rows[start : start + chunk]).float()
        logp = -F.cross_entropy(logits, wanted[start : start + chunk], reduction="none")
        sums = sums.index_add(0, owner[start : start + chunk], logp)
    if rows.shape[0] == 0:
        # Keep the graph connected so every rank still joins the gradient all-reduce.
        sums = sums + hidden.sum() * 0.0
    return sums, counts


def sft_loss_sum(logp_sums: torch.Tensor, counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over samples of the quantity whose step-wide mean is the SFT loss."""
    if reduction == "token":
        return -logp_sums.sum()
    has = counts > 0
    return -(logp_sums[has] / counts[has]).sum()


def step_normaliser(counts: torch.Tensor, reduction: str) -> int:
    """What `sft_loss_sum` is divided by: supervised tokens, or samples that have any."""
    return int(counts.sum()) if reduction == "token" else int((counts > 0).sum())


@dataclass
class DPOTerms:
    losses: torch.Tensor  # (pairs,)
    chosen_rewards: torch.Tensor  # (pairs,), detached
    rejected_rewards: torch.Tensor  # (pairs,), detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> DPOTerms:
    """Per-pair DPO loss (Rafailov et al. 2023), -log sigmoid(beta * (policy margin - reference
    margin)); with label smoothing e, the conservative variant (1-e)*that + e*(flipped pair)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return DPOTerms(losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach())


# ---- GRPO -------------------------------------------------------------------------------------
# Definitions as in TRL's GRPOTrainer (token-level importance ratio, two-sided clip, the k3 KL
# estimate), so a TRL recipe's settings mean the same here; tests/train/test_grpo.py checks the
# loss and its gradient against TRL's own code.

def token_logps(hidden: torch.Tensor, batch: Batch, head, chunk: int = 1024) -> torch.Tensor:
    """Log-prob of each sample's target tokens, as a (samples, longest) tensor left-aligned per
    sample (0 past a sample's own targets): a completion's per-token log-probs, in order."""
    keep = batch.targets != IGNORE_INDEX
    rows, wanted, owner = hidden[keep], batch.targets[keep], batch.segments[keep]
    n = len(batch.ids)
    counts = torch.bincount(owner, minlength=n)
    width = int(counts.max()) if counts.numel() else 0
    # Where each kept position goes: its sample's row, and its rank among that sample's targets.
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(owner, stable=True)
    column = torch.empty_like(owner)
    column[order] = torch.arange(len(owner), device=owner.device) - starts[owner[order]]
    parts = []
    for start in range(0, rows.shape[0], chunk):
        logits = head(rows[start : start + chunk]).float()
        parts.append(-F.cross_entropy(logits, wanted[start : start + chunk], reduction="none"))
    flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0.0
    out = hidden.new_zeros((n, width), dtype=torch.float32)
    return out.index_put((owner, column), flat)


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each completion's group had zero reward spread) for rewards laid out as
    consecutive groups of `group` completions of one prompt: reward - group mean, divided by the
    group's (or, `batch`, all rewards') unbiased std + 1e-4; `none` does not divide."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    group_std = grouped.std(dim=1).repeat_interleave(group)
    std = rewards.std().expand_as(rewards) if scale == "batch" else group_std
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    zero_spread = torch.isclose(group_std, torch.zeros_like(group_std))
    return advantages, zero_spread


@dataclass
class GRPOTerms:
    per_token: torch.Tensor  # (N, T) loss per completion token (unmasked)
    kl: torch.Tensor | None  # (N, T) per-token KL estimate to the reference, detached
    clipped: torch.Tensor  # (N, T) bool: the ratio was clipped where it mattered (TRL's region clip)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                    epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> GRPOTerms:
    """Per-token clipped surrogate -min(r A, clip(r, 1-eps_low, 1+eps_high) A), r = pi / pi_old,
    plus beta times the KL estimate exp(ref - logp) - (ref - logp) - 1."""
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = None
    if beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * per_token_kl
        kl = per_token_kl.detach()
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return GRPOTerms(per_token, kl, clipped.detach())


def grpo_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of the step's GRPO loss: `grpo` sums each completion's mean token loss;
    `dr_grpo` and `dapo` sum every completion token's loss. `grpo_normaliser` is its divisor."""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return masked.sum()


def grpo_normaliser(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:
    """What `grpo_loss_sum` is divided by: completions (`grpo`), completions x max_new_tokens
    (`dr_grpo`), completion tokens (`dapo`). All add up over micro-batches and ranks."""
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    return float(mask.sum())
