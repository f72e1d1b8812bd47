"""What a stage optimises: SFT or DPO. An objective knows its step normaliser and its loss; the
loop around it (data, accumulation, clipping, checkpoints) is the same for both."""

from __future__ import annotations

import torch

from vlmkit.data.pipeline import MicroBatch
from vlmkit.model.vlm import lm_head
from vlmkit.train.losses import decoder_hidden, dpo_loss, sequence_logps, sft_loss_sum, step_normaliser


class SFTObjective:
    dpo = False

    def __init__(self, stage):
        self.reduction = stage.loss_reduction

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        """This rank's part of the step's normaliser (summed over ranks by the loop): supervised
        tokens, or samples that have any. Both add up across ranks."""
        counts = torch.tensor([c for mb in micro for c in mb.counts], dtype=torch.long)
        return float(step_normaliser(counts, self.reduction)) if counts.numel() else 0.0

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        logps, n_targets = sequence_logps(decoder_hidden(wrapped, batch), batch, lm_head(model.llm))
        return sft_loss_sum(logps, n_targets, self.reduction), n_targets


class DPOObjective:
    """Chosen and rejected responses in one forward; the reference is a frozen copy of the policy
    as it entered the stage (`model`), its log-probs scored once up front (`precompute`, indexed
    by global record index), or the data's own (`data`)."""

    dpo = True

    def __init__(self, stage, reference_model=None, reference_logps: torch.Tensor | None = None):
        self.beta, self.smoothing, self.mode = stage.dpo.beta, stage.dpo.label_smoothing, stage.dpo.reference
        self.reference_model, self.reference_logps = reference_model, reference_logps

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        return float(sum(len(mb.indices) for mb in micro))

    def reference(self, batch, mb: MicroBatch, device) -> torch.Tensor:
        """Reference log-probs of the batch's sequences (chosen first, then rejected)."""
        if self.reference_model is not None:
            with torch.no_grad():
                hidden = decoder_hidden(self.reference_model, batch)
                return sequence_logps(hidden, batch, lm_head(self.reference_model.llm))[0]
        if self.mode == "data":
            refs = torch.tensor(mb.refs, dtype=torch.float32)
        else:
            refs = self.reference_logps[torch.tensor(mb.indices)]
        return torch.cat([refs[:, 0], refs[:, 1]]).to(device)

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        logps, n_targets = sequence_logps(decoder_hidden(wrapped, batch), batch, lm_head(model.llm))
        k = len(mb.indices)
        ref = self.reference(batch, mb, logps.device)
        terms = dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], self.beta, self.smoothing)
        stats["chosen_reward"] += float(terms.chosen_rewards.sum())
        stats["rejected_reward"] += float(terms.rejected_rewards.sum())
        stats["reward_accuracy"] += float((terms.chosen_rewards > terms.rejected_rewards).float().sum())
        return terms.losses.sum(), n_targets
