"""What a stage optimises: SFT, DPO, embedding alignment or GRPO. An objective knows its step normaliser,
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
from vlmkit.train.losses import (
    decoder_hidden,
    decoder_rows,
    dpo_loss,
    grpo_loss_sum,
    grpo_normaliser,
    grpo_token_loss,
    sequence_logps,
    sft_loss_sum,
    step_normaliser,
    token_logps,
)
from vlmkit.train.rewards import build_reward
from vlmkit.train.rollout import Rollout, roll_out

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
    # Micro-batches also carry their encoded samples (`MicroBatch.samples`), not only the batch.
    keeps_samples = False
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
        logps, n_targets = sequence_logps(decoder_rows(wrapped, batch), batch, lm_head(model.llm))
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
            logps = sequence_logps(decoder_rows(model, batch), batch, lm_head(model.llm))[0].float().cpu()
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
                hidden = decoder_rows(self.reference_model, batch)
                return sequence_logps(hidden, batch, lm_head(self.reference_model.llm))[0]
        if self.mode == "data":
            refs = torch.tensor(mb.refs, dtype=torch.float32)
        else:
            refs = self.reference_logps[torch.tensor(mb.indices)]
        return torch.cat([refs[:, 0], refs[:, 1]]).to(device)

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        logps, n_targets = sequence_logps(decoder_rows(wrapped, batch), batch, lm_head(model.llm))
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


class GRPOObjective(Objective):
    """`loss: grpo`: group relative policy optimisation (TRL's GRPOTrainer, with its loss variants).

    A step's micro-batches are its generation batch: before the step's first forward
    (`local_normaliser`), every record's prompt gets G sampled completions, each scored by the
    reward against the record's last assistant turn and given its advantage within its group
    (`rollout.py`). The step's loss is then the clipped policy-ratio objective over those
    completions, with the KL penalty to a frozen copy of the entering policy when beta > 0. With
    num_iterations > 1 the same completions serve that many steps (the data the later steps
    draw is left unused), scored once under the policy that sampled them. The sampling seed is
    drawn from the training RNG, which checkpoints keep, so a resumed run samples alike.
    """

    keeps_samples = True

    def __init__(self, stage: StageConfig, reference_model=None):
        self.cfg = stage.grpo
        self.reward = build_reward(self.cfg.reward, self.cfg.format_pattern)
        self.reference_model = reference_model
        self.model = None
        self.stat_keys = ("reward", "reward_sq", "completions", "completion_tokens", "zero_std_groups", "groups",
                          "masked_tokens", "clipped", "kl", *(f"{k}:{n}" for n in self.reward.terms for k in ("reward", "reward_sq")))
        self.buffer: list[Rollout] = []
        self.cursor = 0
        self.updates = 0

    @classmethod
    def check(cls, name: str, config: Config, dist: DistContext) -> None:
        stage = config.train.stages[name]
        try:
            build_reward(stage.grpo.reward, stage.grpo.format_pattern)
        except ValueError as e:
            raise ValueError(f"stage {name}: {e}") from None
        if dist.enabled and config.train.distributed == "fsdp2":
            # Each rank decodes its own prompts for as many steps as its completions need, so the
            # all-gathers of sharded weights inside generation would not line up across ranks.
            raise ValueError(f"stage {name}: loss grpo runs under DDP (train.distributed: ddp), not fsdp2")
        if stage.packing:
            raise ValueError(f"stage {name}: loss grpo builds its own batches of completions; packing does not apply")
        if stage.grad_accum > 32:
            raise ValueError(f"stage {name}: loss grpo samples a whole step's completions before its first forward; "
                             f"grad_accum {stage.grad_accum} is over 32")
        every, mu = config.train.save_every, stage.grpo.num_iterations
        if mu > 1 and every and every % mu:
            raise ValueError(f"stage {name}: train.save_every ({every}) must be a multiple of grpo.num_iterations ({mu}), "
                             "so a checkpoint never falls inside the updates of one generation batch")

    @classmethod
    def for_stage(cls, name: str, stage: StageConfig, model, mixture: Mixture) -> GRPOObjective:
        # The reference is the policy as it enters the stage: copied before any resume load.
        reference = copy.deepcopy(model).eval().requires_grad_(False) if stage.grpo.beta > 0 else None
        return cls(stage, reference)

    def start(self, model, state: dict | None, in_order: InOrder) -> None:
        self.model = model
        if state is not None:
            self.updates = int(state.get("grpo_updates", 0))

    def local_normaliser(self, micro: list[MicroBatch]) -> float:
        """Sample and score this step's completions (a fresh generation batch every num_iterations
        steps); the normaliser is the loss type's count over them."""
        if not self.buffer or self.updates % self.cfg.num_iterations == 0:
            self.buffer = []
            for mb in micro:
                if mb.batch is None:
                    continue
                seed = int(torch.randint(0, 2**62, (1,)))
                self.buffer.append(roll_out(self.model, mb.samples, self.reward, self.cfg, seed,
                                            reference_model=self.reference_model, keep_old=self.cfg.num_iterations > 1))
        self.updates += 1
        self.cursor = 0
        return sum(grpo_normaliser(r.mask, self.cfg.loss_type, self.cfg.max_new_tokens) for r in self.buffer)

    def loss(self, wrapped, model, batch, mb: MicroBatch, stats: dict):
        rollout = self.buffer[self.cursor]
        self.cursor += 1
        logps = token_logps(decoder_hidden(wrapped, rollout.batch), rollout.batch, lm_head(model.llm))
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        eps = self.cfg.epsilon
        terms = grpo_token_loss(logps, old, rollout.advantages, eps, self.cfg.epsilon_high or eps, self.cfg.beta, rollout.ref_logps)
        mask = rollout.mask
        for key, value in rollout.stats.items():
            stats[key] += value
        stats["masked_tokens"] += float(mask.sum())
        stats["clipped"] += float((terms.clipped * mask).sum())
        if terms.kl is not None:
            stats["kl"] += float((terms.kl * mask).sum())
        return grpo_loss_sum(terms.per_token, mask, self.cfg.loss_type), mask.sum(-1).long()

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """TRL's names: the reward's mean and std over the step's completions (and each term's),
        the share of groups whose rewards were all equal (they teach nothing), the mean completion
        length, the share of completion tokens whose ratio was clipped, and the mean KL."""
        n, tokens = max(1.0, totals["completions"]), max(1.0, totals["masked_tokens"])

        def mean_std(total: float, squares: float) -> tuple[float, float]:
            mean = total / n
            return mean, max(0.0, squares / n - mean * mean) ** 0.5

        out = {}
        out["reward"], out["reward_std"] = mean_std(totals["reward"], totals["reward_sq"])
        for name in self.reward.terms:
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = mean_std(totals[f"reward:{name}"], totals[f"reward_sq:{name}"])
        out["frac_reward_zero_std"] = totals["zero_std_groups"] / max(1.0, totals["groups"])
        out["completions/mean_length"] = totals["completion_tokens"] / n
        out["clip_ratio/region_mean"] = totals["clipped"] / tokens
        if self.cfg.beta > 0:
            out["kl"] = totals["kl"] / tokens
        return out

    def state(self) -> dict:
        return {"grpo_updates": self.updates}


# A stage's `loss` names its objective.
OBJECTIVES: dict[str, type[Objective]] = {"sft": SFTObjective, "dpo": DPOObjective, "embed-align": EmbedAlignObjective,
                                          "grpo": GRPOObjective}
