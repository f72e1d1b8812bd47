"""What a stage optimises: SFT, DPO or embedding alignment. An objective knows its step normaliser
and its loss; the loop around it (data, accumulation, clipping, checkpoints) is the same for all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.data.pipeline import MicroBatch
from vlmkit.model.vlm import IGNORE_INDEX, lm_head
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


class EmbedAlignObjective:
    """`loss: embed-align`: the connector learns to write what an image shows into its visual
    tokens as the LLM's own input embeddings, with no LLM pass at all.

    Each supervised token of a sample (an answer word, a caption word; not end-of-turn, other
    special tokens or whitespace) is matched with the sample's visual token most similar to its input
    embedding, and the loss is 1 - that cosine, averaged over the step's tokens. A word, colour
    or count the image shows then sits among the visual tokens as the vector the LLM already
    reads, so the `sft` stage after it teaches the LLM to copy rather than to decode. A step
    costs only the connector (and the tower, unless its features are cached).
    """

    dpo = False

    def __init__(self, model):
        self.model = model
        self.special = set(model.tokenizer.all_special_ids)
        self._blank: dict[int, bool] = {}

    def _skipped(self, ids: torch.Tensor) -> torch.Tensor:
        """Special tokens and whitespace (the newline a chat template puts after end-of-turn)
        carry nothing an image shows."""
        for t in ids.unique().tolist():
            if t not in self._blank:
                self._blank[t] = t in self.special or not self.model.tokenizer.decode([t]).strip()
        skip = [t for t, blank in self._blank.items() if blank]
        return torch.isin(ids, torch.tensor(skip, dtype=ids.dtype, device=ids.device))

    def selection(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) bool masks: the supervised tokens worth matching, of samples that have visual
        tokens; and the visual-token slots."""
        supervised = batch.targets != IGNORE_INDEX
        keep = supervised & ~self._skipped(batch.targets.masked_fill(~supervised, 0))
        slots = self.model.slot_mask(batch.input_ids)
        with_image = torch.zeros(len(batch.ids) + 1, dtype=torch.bool, device=slots.device)
        with_image[batch.segments[slots]] = True
        return keep & with_image[batch.segments], slots

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        return float(sum(int(self.selection(mb.batch)[0].sum()) for mb in micro if mb.batch is not None))

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        embeds = model.inputs_embeds(batch.input_ids, batch.images, batch.image_features, None, cached=False)
        keep, slots = self.selection(batch)
        visual = F.normalize(embeds[slots].float(), dim=-1)
        table = model.llm.get_input_embeddings().weight
        wanted = F.normalize(table[batch.targets[keep]].float(), dim=-1)
        owner, visual_owner = batch.segments[keep], batch.segments[slots]
        similarity = (wanted @ visual.T).masked_fill(owner[:, None] != visual_owner[None, :], -2.0)
        per_token = 1.0 - similarity.max(dim=1).values
        return per_token.sum(), torch.bincount(owner, minlength=len(batch.ids))
