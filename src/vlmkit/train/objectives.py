"""What a stage optimises: SFT, DPO or embedding alignment. An objective knows its step normaliser,
its loss and its own metrics, and does its own set-up; the loop around it (data, accumulation,
clipping, checkpoints) is the same for all."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from vlmkit.config import Config, StageConfig
from vlmkit.data.collate import Batch
from vlmkit.data.pipeline import MicroBatch
from vlmkit.data.sources import Mixture
from vlmkit.model.vlm import IGNORE_INDEX, lm_head
from vlmkit.train.distributed import DistContext
from vlmkit.train.losses import decoder_hidden, dpo_loss, sequence_logps, sft_loss_sum, step_normaliser

# Every micro-batch of the stage's data once, in record order, on the device: `in_order(desc)`.
InOrder = Callable[[str], Iterable[tuple[MicroBatch, Batch]]]


class Objective:
    """The protocol the loop trains through. In a stage's life:

    - `check` (before any work): refuse a stage this objective cannot train;
    - `for_stage` (once the data is indexed, before any resume): the objective, with any set-up that
      must see the model as it enters the stage;
    - `start` (after any resume): set-up that reads the resumed state or the data;
    - per step: `local_normaliser` of the step's micro-batches, `loss` of each, which also adds to
      the step's sums named in `stat_keys`; `metrics` of their totals over ranks are logged;
    - `state`: what a periodic checkpoint keeps for `start` to read back.
    """

    # Each data unit is a (chosen, rejected) pair rather than one sample.
    pairs = False
    # The per-step sums `loss` adds to; the loop sums them over ranks for `metrics`.
    stat_keys: tuple[str, ...] = ()

    @classmethod
    def check(cls, name: str, config: Config, dist: DistContext) -> None:
        pass

    @classmethod
    def for_stage(cls, name: str, stage: StageConfig, model, mixture: Mixture) -> Objective:
        return cls(stage)

    def start(self, model, state: dict | None, in_order: InOrder) -> None:
        pass

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        """This rank's part of the step's normaliser (summed over ranks by the loop)."""
        raise NotImplementedError

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the micro-batch's loss summed, before the step's normaliser; supervised tokens per sample)."""
        raise NotImplementedError

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Keys this objective adds to each `metrics.jsonl` step record."""
        return {}

    def state(self) -> dict:
        return {}


class SFTObjective(Objective):
    """Next-token loss on the supervised (assistant) tokens."""

    def __init__(self, stage: StageConfig):
        self.reduction = stage.loss_reduction

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        """Supervised tokens, or samples that have any: both add up across ranks."""
        counts = torch.tensor([c for mb in micro for c in mb.counts], dtype=torch.long)
        return float(step_normaliser(counts, self.reduction)) if counts.numel() else 0.0

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        logps, n_targets = sequence_logps(decoder_hidden(wrapped, batch), batch, lm_head(model.llm))
        return sft_loss_sum(logps, n_targets, self.reduction), n_targets


class DPOObjective(Objective):
    """Chosen and rejected responses in one forward; the reference is a frozen copy of the policy
    as it entered the stage (`model`), its log-probs scored once up front (`precompute`, indexed
    by global record index, and kept in periodic checkpoints), or the data's own (`data`)."""

    pairs = True
    stat_keys = ("chosen_reward", "rejected_reward", "reward_accuracy")

    def __init__(self, stage: StageConfig, reference_model=None, reference_logps: torch.Tensor | None = None, records: int = 0):
        self.beta, self.smoothing, self.mode = stage.dpo.beta, stage.dpo.label_smoothing, stage.dpo.reference
        self.reference_model, self.reference_logps = reference_model, reference_logps
        self.records = records

    @classmethod
    def for_stage(cls, name: str, stage: StageConfig, model, mixture: Mixture) -> DPOObjective:
        if stage.dpo.reference == "data":
            missing = sum(s.missing_refs for s in mixture.sources)
            if missing:
                raise ValueError(f"stage {name}: dpo.reference=data but {missing} pair(s) carry no ref_chosen_logp/ref_rejected_logp")
        # The reference is the policy as it enters the stage: copied before any resume load.
        reference_model = copy.deepcopy(model).eval().requires_grad_(False) if stage.dpo.reference == "model" else None
        return cls(stage, reference_model, records=len(mixture))

    def start(self, model, state: dict | None, in_order: InOrder) -> None:
        if self.mode != "precompute":
            return
        if state is not None and "reference_logps" in state:
            self.reference_logps = state["reference_logps"]
        else:
            self.reference_logps = self._score_pairs(model, in_order("reference log-probs"))

    @torch.no_grad()
    def _score_pairs(self, model, batches: Iterable[tuple[MicroBatch, Batch]]) -> torch.Tensor:
        """Sequence log-probs of every (chosen, rejected) pair under the model as it is now, by global
        record index (NaN where a record is unusable)."""
        was_training = model.training
        model.eval()
        out = torch.full((self.records, 2), float("nan"))
        for mb, batch in batches:
            logps = sequence_logps(decoder_hidden(model, batch), batch, lm_head(model.llm))[0].float().cpu()
            k = len(mb.indices)
            out[torch.tensor(mb.indices)] = torch.stack([logps[:k], logps[k:]], dim=1)
        model.train(was_training)
        return out

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        """Pairs."""
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

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Mean implicit rewards per pair, their margin, and how often chosen beats rejected."""
        pairs = max(1.0, totals["units"])
        return {"chosen_reward": totals["chosen_reward"] / pairs, "rejected_reward": totals["rejected_reward"] / pairs,
                "reward_margin": (totals["chosen_reward"] - totals["rejected_reward"]) / pairs,
                "reward_accuracy": totals["reward_accuracy"] / pairs}

    def state(self) -> dict:
        return {"reference_logps": self.reference_logps} if self.reference_logps is not None else {}


class EmbedAlignObjective(Objective):
    """`loss: embed-align`: the connector learns to write what an image shows into its visual
    tokens as the LLM's own input embeddings, with no LLM pass at all.

    Each supervised token of a sample (an answer word, a caption word; not end-of-turn, other
    special tokens or whitespace) is matched with the sample's visual token most similar to its input
    embedding, and the loss is 1 - that cosine, averaged over the step's tokens. A word, colour
    or count the image shows then sits among the visual tokens as the vector the LLM already
    reads, so the `sft` stage after it teaches the LLM to copy rather than to decode. A step
    costs only the connector (and the tower, unless its features are cached).
    """

    def __init__(self, model):
        self.model = model
        self.special = set(model.tokenizer.all_special_ids)
        self._blank: dict[int, bool] = {}

    @classmethod
    def check(cls, name: str, config: Config, dist: DistContext) -> None:
        if config.model.fusion != "prefix" or dist.enabled:
            # The loss reads visual tokens from the input sequence and runs outside the model's
            # forward, so neither cross-attention memory nor DDP's gradient hooks would see it.
            raise ValueError(f"stage {name}: loss embed-align needs prefix fusion and one process "
                             f"(fusion {config.model.fusion!r}, {dist.world_size} process(es))")

    @classmethod
    def for_stage(cls, name: str, stage: StageConfig, model, mixture: Mixture) -> EmbedAlignObjective:
        return cls(model)

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
        """Matched tokens."""
        return float(sum(int(self.selection(mb.batch)[0].sum()) for mb in micro if mb.batch is not None))

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        embeds = model.inputs_embeds(batch.input_ids, batch.visuals, cached=False)
        keep, slots = self.selection(batch)
        visual = F.normalize(embeds[slots].float(), dim=-1)
        table = model.llm.get_input_embeddings().weight
        wanted = F.normalize(table[batch.targets[keep]].float(), dim=-1)
        owner, visual_owner = batch.segments[keep], batch.segments[slots]
        similarity = (wanted @ visual.T).masked_fill(owner[:, None] != visual_owner[None, :], -2.0)
        per_token = 1.0 - similarity.max(dim=1).values
        return per_token.sum(), torch.bincount(owner, minlength=len(batch.ids))


# A stage's `loss` names its objective.
OBJECTIVES: dict[str, type[Objective]] = {"sft": SFTObjective, "dpo": DPOObjective, "embed-align": EmbedAlignObjective}
