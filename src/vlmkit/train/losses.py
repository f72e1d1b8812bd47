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


def _prefix(model, batch: Batch) -> dict:
    """The prompt mask, for models whose attention rule reads it (prefix-LM)."""
    inner = getattr(model, "module", model)  # DDP
    rule = inner.attention_rule.name
    return {"prefix_mask": batch.prompt_mask} if rule == "prefix" else {}


def sequence_logps(hidden: torch.Tensor, batch: Batch, head, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs, number of targets) per sample of `batch`, in `batch.ids` order."""
    keep = batch.targets != IGNORE_INDEX
    rows = hidden[keep]
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
