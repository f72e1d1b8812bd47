"""The training loop, readable top to bottom.

Per stage: check any checkpoint to resume from against the config (before any work), take the
stage's indexed data (records located, not decoded), wrap the model for DDP / FSDP2, then AdamW
with warmup + cosine, gradient accumulation and clipping. Micro-batches are read and encoded on
demand by DataLoader workers (`StageInput`); the objective (`SFTObjective`, `DPOObjective`) builds
the loss; a frozen vision tower's features come from `FrozenFeatures` (on disk when enabled). Each step's loss is normalised by the whole step's count (all
micro-batches, all ranks), so accumulation, packing and data parallelism all compute the loss
one big batch would. Periodic checkpoints hold weights, optimizer, scheduler, every RNG and the
data position; resuming from one reproduces the uninterrupted run bit for bit on the CPU.
SIGTERM finishes the current step, saves, and exits with status 143.
"""

from __future__ import annotations

import collections
import copy
import math
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.config import Config, StageConfig
from vlmkit.data.formats import BadRecordError, Sample
from vlmkit.data.pipeline import MicroBatch, SequentialSampler, StageDataset, StageInput, encode_record, last_turn_only, make_loader, receive
from vlmkit.data.sources import Mixture
from vlmkit.processing import build_chat_processor
from vlmkit.processing.prompt import ChatProcessor, EncodedSample
from vlmkit import checkpoint as ckpt
from vlmkit.train import distributed as D
from vlmkit.train.features import FrozenFeatures
from vlmkit.model.vlm import lm_head
from vlmkit.train.losses import decoder_hidden, sequence_logps
from vlmkit.train.objectives import DPOObjective, EmbedAlignObjective, SFTObjective
from vlmkit.train.preflight import StageData
from vlmkit.train.stages import apply_stage, make_optimizer
from vlmkit.train.telemetry import FlopModel, Telemetry, peak_flops
from vlmkit.utils import JsonlLogger, seed_everything

# Micro-batches of one optimizer step read before its first forward (see the step loop); a
# longer `grad_accum` streams its micro-batches instead of holding them all.
GATHERED_MICRO_BATCHES = 32

# Exit status after a SIGTERM-triggered save: the conventional 128 + SIGTERM.
PREEMPTED_EXIT = 128 + signal.SIGTERM


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason), one per skipped record
    checkpoint: Path | None = None
    trainable_parameters: dict[str, int] = field(default_factory=dict)
    loaded: bool = False  # an already trained stage, loaded from its checkpoint: no steps were run
    extended: bool = False  # trained on from its own earlier checkpoint (--extend)
    eval_seconds: float = 0.0  # of `seconds`, spent on held-out evaluation (`train.eval`)


class Preempted(SystemExit):
    """Raised after SIGTERM once the state is saved; exits quietly with status 143."""


def encode_all(processor: ChatProcessor, samples: list[Sample | BadRecordError], on_bad: str, desc: str
               ) -> tuple[list[EncodedSample], list[tuple[str, str]]]:
    """Encode every sample up front, so a bad record surfaces before any step is taken. Items that
    are already `BadRecordError`s (records that could not be read) count as bad records."""
    encoded, skipped = [], []
    for sample in tqdm(samples, desc=f"encode {desc}", unit="sample", leave=False):
        try:
            if isinstance(sample, BadRecordError):
                raise sample
            encoded.append(encode_record(processor, sample))
        except BadRecordError as e:
            if on_bad == "error":
                raise
            skipped.append((e.record_id, str(e)))
    if not encoded:
        raise ValueError(f"stage {desc}: no usable records ({len(skipped)} skipped)")
    return encoded, skipped


def encode_pairs(processor: ChatProcessor, path: str, on_bad: str, desc: str):
    """(chosen, rejected) encodings of every preference record, plus reference log-probs when the
    data carries them; a record with a missing side stops the run here, before any step."""
    from vlmkit.data.preference import read_preference_file

    units, refs, skipped = [], [], []
    for item in tqdm(read_preference_file(path), desc=f"encode {desc}", unit="pair", leave=False):
        try:
            if isinstance(item, BadRecordError):
                raise item
            units.append([last_turn_only(encode_record(processor, item.sample(side))) for side in ("chosen", "rejected")])
            refs.append((item.ref_chosen_logp, item.ref_rejected_logp))
        except BadRecordError as e:
            if on_bad == "error":
                raise
            skipped.append((e.record_id, str(e)))
    if not units:
        raise ValueError(f"stage {desc}: no usable preference pairs ({len(skipped)} skipped)")
    return units, refs, skipped


# ---- resume checks ----------------------------------------------------------------------------

# Keys of `train` that change what a stage computes; the rest (paths, logging, device) may differ.
TRAJECTORY_KEYS = ("seed", "max_length", "precision", "on_bad_record", "cache_frozen_vision", "distributed")


def _resume_view(tree: dict, stage: str) -> dict:
    train = tree.get("train", {})
    settings = dict(train.get("stages", {}).get(stage) or {})
    # The data is compared by its contents (the digest in meta.json), not by where the file lies.
    settings.pop("data", None)
    return {"model": tree.get("model", {}),
            "train": {**{k: train.get(k) for k in TRAJECTORY_KEYS}, "stages": {stage: settings}}}


def stage_differences(directory: Path, config: Config, stage: str, data_sha256: str | None = None,
                      after: str | None = None) -> list[str]:
    """What differs between the run a stage checkpoint was written by and this one: dotted config
    keys, the data file's contents, and the earlier stage it was trained on top of."""
    # Re-validated, so keys added since the checkpoint was written compare as their defaults.
    saved = ckpt.read_config(directory)
    diffs = ckpt.config_differences(_resume_view(saved.model_dump(mode="json"), stage),
                                    _resume_view(config.model_dump(mode="json"), stage))
    meta = ckpt.read_meta(directory)
    if data_sha256 and meta.get("data_sha256") not in (None, data_sha256):
        before = saved.train.stages[stage].data if stage in saved.train.stages else "?"
        diffs.append(f"train.stages.{stage}.data: not the data the checkpoint was trained on "
                     f"(checkpoint {before}, now {config.train.stages[stage].data}, contents differ)")
    if "after" in meta and meta["after"] != after:
        diffs.append("an earlier stage was trained again since this stage was trained on top of it")
    return diffs


def _mismatch(stage: str, directory: Path, diffs: list[str], finished: bool) -> ckpt.ResumeMismatchError:
    if finished:
        what, hint = "is already trained", (
            "To train it again from the start under the new settings, add --restart; to continue from its "
            "trained weights, add --extend (either way, the stages after it are trained again).")
    else:
        what, hint = "has a checkpoint to resume from", "To discard that checkpoint and start the stage over, add --restart."
    return ckpt.ResumeMismatchError(
        f"stage {stage!r} {what} in {directory}, under different settings:\n  " + "\n  ".join(diffs[:20])
        + f"\n{hint} Or use the original settings, or a new train.output_dir."
    )


def check_resume_config(directory: Path, config: Config, stage: str, data_sha256: str | None = None, after: str | None = None) -> None:
    """Refuse to resume a stage from a periodic checkpoint written under other settings."""
    diffs = stage_differences(directory, config, stage, data_sha256, after)
    if diffs:
        raise _mismatch(stage, directory, diffs, finished=False)


# ---- SIGTERM ----------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (a signal handler must not save)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---- one stage --------------------------------------------------------------------------------

def _skipped_report(mixture: Mixture, encode_time: dict[int, tuple[str, str]]) -> list[tuple[str, str]]:
    """Every record left out, in data order: those ruled out while indexing and those found while encoding."""
    rows = [((k, b.index), b.record_id, b.message) for k, s in enumerate(mixture.sources) for b in s.bad]
    for g, (rid, message) in encode_time.items():
        k, i = mixture.locate(g)
        rows.append(((k, mixture.sources[k].record_index(i)), rid, message))
    return [(rid, message) for _, rid, message in sorted(rows, key=lambda r: r[0])]


def _encode_skips(dist: D.DistContext, data_in: StageInput, data: StageData, max_fraction: float) -> tuple[int, str | None]:
    """How many distinct records were found unusable while encoding so far, over all ranks, and one
    of their messages. Each rank counts its own; their exact union (over the epochs one record may
    reach several ranks) is gathered only when the plain sum could be refused."""
    (total,) = dist.all_sum([float(len(data_in.skipped))])
    example = next(iter(data_in.skipped.values()))[1] if data_in.skipped else None
    if not dist.enabled or total <= min(max_fraction * data.records, data.records - 1) - data.unusable:
        return int(total), example
    merged = {}
    for part in dist.gather_objects(data_in.skipped):
        merged.update(part)
    return len(merged), next(iter(merged.values()))[1] if merged else None


def train_stage(model, config: Config, name: str, stage: StageConfig, out_dir: Path, logger: JsonlLogger | None = None,
                progress: bool = True, dist: D.DistContext | None = None, stop: _StopFlag | None = None,
                *, data_sha256: str | None = None, after: str | None = None, discard_mismatched: bool = False,
                data: StageData | None = None) -> StageResult:
    """`data_sha256`, `after`: the data file's digest and the id of the previous stage's
    checkpoint, kept in this stage's checkpoints so a later run can tell what changed.
    `discard_mismatched`: drop a periodic checkpoint written under other settings instead of refusing.
    `data`: the stage's indexed data from the preflight check (indexed here when not given)."""
    from vlmkit.train.preflight import check_skip_rate, check_stage_data, nothing_trained

    dist = dist or D.DistContext()
    tcfg = config.train
    device = torch.device(D.local_device(dist, tcfg.device))
    D.check_divides(dist, name, stage.batch_size)
    stage_dir = out_dir / "checkpoints" / name
    resume_dir = ckpt.latest_resumable(stage_dir)
    if resume_dir is not None and stage_differences(resume_dir, config, name, data_sha256, after):
        if not discard_mismatched:
            check_resume_config(resume_dir, config, name, data_sha256, after)
        if dist.is_main:
            print(f"[vlmkit] stage {name}: discarding {resume_dir.name} (written under other settings)")
            ckpt.remove_periodic(stage_dir)
        dist.barrier()
        resume_dir = None
    lineage = {"after": after, "data_sha256": data_sha256}
    if stage.loss == "embed-align" and (config.model.fusion != "prefix" or dist.enabled):
        # The loss reads visual tokens from the input sequence and runs outside the model's
        # forward, so neither cross-attention memory nor DDP's gradient hooks would see it.
        raise ValueError(f"stage {name}: loss embed-align needs prefix fusion and one process "
                         f"(fusion {config.model.fusion!r}, {dist.world_size} process(es))")
    if stage.packing and config.model.fusion != "prefix":
        raise ValueError(f"stage {name}: packing needs prefix fusion (cross-attention memory is per row, so packed samples would see each other's images)")

    apply_stage(model, stage)
    processor = build_chat_processor(model, tcfg.max_length)
    dpo = stage.loss == "dpo"
    data = data if data is not None and data.mixture is not None else check_stage_data(name, stage, tcfg.on_bad_record, tcfg.max_skip_fraction)
    mixture = data.mixture
    if dpo and stage.dpo.reference == "data":
        missing = sum(getattr(s, "missing_refs", 0) for s in mixture.sources)
        if missing:
            raise ValueError(f"stage {name}: dpo.reference=data but {missing} pair(s) carry no ref_chosen_logp/ref_rejected_logp")
    if data.unusable and dist.is_main:
        print(f"[vlmkit] stage {name}: leaving out {data.unusable} unusable record(s), e.g. "
              f"{next(b for s in mixture.sources for b in s.bad).message}")

    vision_cached = "vision" not in stage.trainable and tcfg.cache_frozen_vision
    features = None
    if vision_cached:
        cache_dir = None
        if tcfg.feature_cache:
            cache_dir = Path(tcfg.feature_cache_dir) if tcfg.feature_cache_dir else out_dir / "feature_cache"
        features = FrozenFeatures(model, cache_dir, int(tcfg.feature_cache_gb * 1e9), bf16=tcfg.precision == "bf16")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    dataset = StageDataset(mixture, processor, dpo=dpo, pad_id=pad_id, packing=stage.packing, capacity=stage.pack_length or tcfg.max_length,
                           max_images=stage.max_images_per_pack, image_keys=features is not None and features.dir is not None)
    pin = device.type == "cuda"

    def on_device(mb: MicroBatch):
        batch = mb.batch.to(device)
        if features is not None:
            batch.image_features = features.features(batch, mb.image_keys)
        return batch

    # The reference is the policy as it enters the stage: copy or score it before any resume load.
    reference_model = None
    if dpo and stage.dpo.reference == "model":
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)

    per_epoch = math.ceil(len(mixture) / (stage.batch_size * stage.grad_accum))
    total_steps = stage.max_steps or max(1, math.ceil(per_epoch * stage.epochs))

    state = None
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        _load_weights(model, resume_dir)
    reference_logps = None
    if dpo and stage.dpo.reference == "precompute":
        if state is not None and "reference_logps" in state:
            reference_logps = state["reference_logps"]
        else:
            reference_logps = _score_pairs(model, dataset, on_device, stage.batch_size, tcfg.num_workers, pin)
    if dpo:
        objective = DPOObjective(stage, reference_model, reference_logps)
    elif stage.loss == "embed-align":
        objective = EmbedAlignObjective(model)
    else:
        objective = SFTObjective(stage)

    wrapped = dist.strategy.wrap(model, dist)
    optimizer, scheduler = make_optimizer(model, stage, total_steps)
    step, losses = 0, []
    if state is not None:
        dist.strategy.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
        if dist.is_main:
            print(f"[vlmkit] stage {name}: resuming at step {step}/{total_steps} from {resume_dir}")
    if logger and dist.is_main:
        # Steps logged after the checkpoint (or before a first one) are about to be redone.
        logger.drop(lambda r: r.get("stage") == name and isinstance(r.get("step"), int) and r["step"] > step)

    # Skip what a resumed run already consumed, so the data order matches an uninterrupted run.
    data_in = StageInput(dataset, stage.batch_size, tcfg.seed, name, dist.rank, dist.world_size, tcfg.num_workers, pin,
                         tcfg.prefetch, tcfg.on_bad_record, consumed=step * stage.grad_accum,
                         source_counts=state.get("source_counts") if state is not None else None)
    if state is not None:
        data_in.skipped.update({int(g): (rid, msg) for g, rid, msg in state.get("skipped", [])})

    def save_periodic() -> None:
        weights = ckpt.model_state(model, ckpt.parts_to_save(model))
        optim_state = dist.strategy.full_optimizer_state(model, optimizer)
        rngs = dist.gather_objects(ckpt.rng_state())
        skipped = [row for rows in dist.gather_objects([(g, *v) for g, v in data_in.skipped.items()]) for row in rows]
        if dist.is_main:
            trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": step, "losses": losses,
                             "rng": rngs, "micro_batches_consumed": data_in.consumed, "units": len(mixture),
                             "source_counts": data_in.source_counts, "skipped": skipped}
            if reference_logps is not None:
                trainer_state["reference_logps"] = reference_logps
            ckpt.rotate_and_save(stage_dir, step, tcfg.keep_last, lambda path: ckpt.save_checkpoint(
                path, model, config, {"stage": name, "step": step, **lineage}, trainer_state, weights=weights))
        dist.barrier()

    heldout = None
    if tcfg.eval is not None and dist.is_main and not dist.enabled and (tcfg.eval.stages is None or name in tcfg.eval.stages):
        from vlmkit.train.heldout import HeldOutEval

        heldout = HeldOutEval(tcfg.eval, bf16=tcfg.precision == "bf16")
    eval_seconds = 0.0

    trained_units, skips_checked = 0, len(data_in.skipped)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    flop_model = FlopModel.of(model, stage.trainable, vision_cached)
    telemetry = Telemetry(device, peak_flops(device, tcfg.peak_tflops))
    bar = tqdm(total=total_steps, initial=step, desc=f"stage {name}", unit="step", disable=not (progress and dist.is_main))
    start = time.perf_counter()
    try:
        while step < total_steps:
            telemetry.reset()
            optimizer.zero_grad(set_to_none=True)
            # A step of up to GATHERED_MICRO_BATCHES micro-batches is read whole first, so its count
            # (all micro-batches, all ranks) is known before any backward and scales each one. A
            # longer accumulation streams: each micro-batch is read, run and let go in turn, and the
            # summed gradients are divided by the count once it is known (the same up to rounding).
            ahead = collections.deque(data_in.next() for _ in range(min(stage.grad_accum, GATHERED_MICRO_BATCHES)))
            streamed = len(ahead) < stage.grad_accum
            normaliser = 1.0 if streamed else dist.all_sum([objective.local_normaliser(list(ahead))])[0]
            streamed_normaliser, loss_sums = 0.0, []
            stats = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "images": 0.0, "supervised": 0.0, "flops": 0.0,
                     "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_accuracy": 0.0, "units": 0.0}
            for m in range(stage.grad_accum):
                mb = ahead.popleft() if ahead else data_in.next()
                if streamed:
                    streamed_normaliser += objective.local_normaliser([mb])
                if mb.batch is None:
                    if dist.enabled:
                        raise RuntimeError(f"stage {name} step {step + 1}: every record of this rank's share of a micro-batch was "
                                           "unusable; with data parallelism, fix or remove the bad records (or use a larger batch)")
                    continue
                batch = on_device(mb)
                telemetry.data_done()
                with dist.strategy.no_sync(wrapped, last=m == stage.grad_accum - 1), autocast:
                    loss_sum, n_targets = objective.loss(wrapped, model, batch, mb, stats)
                # DDP and FSDP average gradients over ranks; the world-size factor undoes that.
                (loss_sum * (dist.world_size / max(1, normaliser))).backward()
                loss_sums.append(float(loss_sum.detach()))
                lengths = [int(x) for x in torch.bincount(batch.segments[batch.segments >= 0], minlength=len(batch.ids))]
                stats["tokens"] += sum(lengths)
                stats["padded"] += batch.input_ids.numel() - sum(lengths)
                stats["images"] += batch.num_images
                stats["supervised"] += int(n_targets.sum())
                stats["units"] += len(mb.indices)
                stats["flops"] += flop_model.step_flops(lengths, int(n_targets.sum()), batch.num_images)
                telemetry.compute_done()
            if streamed:
                (normaliser,) = dist.all_sum([streamed_normaliser])
                _divide_gradients(optimizer, max(1, normaliser))
            for loss_sum in loss_sums:
                stats["loss"] += loss_sum / max(1, normaliser)
            grad_norm = _clip(model, optimizer, stage.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"stage {name} step {step}: non-finite gradient norm ({grad_norm})")
            optimizer.step()
            scheduler.step()
            telemetry.compute_done()
            step += 1
            keys = list(stats)
            totals = dict(zip(keys, dist.all_sum([stats[k] for k in keys])))
            totals["ranks"] = dist.world_size
            trained_units += totals["units"]
            if dist.any(len(data_in.skipped) > skips_checked):
                skips_checked = len(data_in.skipped)
                check_skip_rate(name, data, tcfg.max_skip_fraction, *_encode_skips(dist, data_in, data, tcfg.max_skip_fraction))
            step_loss = totals["loss"]
            losses.append(step_loss)
            rates = telemetry.record(totals)
            postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{rates['tokens_per_s']:.0f}", "data": f"{rates['data_share']:.0%}"}
            if "mfu" in rates:
                postfix["mfu"] = f"{rates['mfu']:.1%}"
            bar.set_postfix(postfix)
            bar.update()
            if logger and dist.is_main and step % tcfg.log_every == 0:
                record = {"stage": name, "step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "supervised_tokens": int(totals["supervised"]), "tokens": int(totals["tokens"]), "images": int(totals["images"]),
                          "elapsed_s": time.perf_counter() - start, "world_size": dist.world_size, **rates}
                if len(mixture.sources) > 1:
                    record["source_shares"] = data_in.shares()
                if data_in.skipped:
                    record["skipped_records"] = len(data_in.skipped)
                if features is not None and features.dir is not None:
                    record.update(features.stats())
                if dpo:
                    pairs = max(1.0, totals["units"])
                    record.update({"chosen_reward": totals["chosen_reward"] / pairs, "rejected_reward": totals["rejected_reward"] / pairs,
                                   "reward_margin": (totals["chosen_reward"] - totals["rejected_reward"]) / pairs,
                                   "reward_accuracy": totals["reward_accuracy"] / pairs})
                logger.log(record)
            if heldout is not None and heldout.due(step, total_steps):
                scores = heldout.run(model)
                eval_seconds += scores["eval_s"]
                bar.set_postfix({**postfix, "held-out": f"{scores['overall']:.0%}"})
                if logger:
                    logger.log({"stage": name, "step": step, **scores})
            preempted = stop is not None and dist.any(stop.set)
            if step < total_steps and (preempted or (tcfg.save_every and step % tcfg.save_every == 0)):
                save_periodic()
            if preempted and step < total_steps:
                bar.close()
                if dist.is_main:
                    print(f"[vlmkit] stage {name}: SIGTERM received; saved step {step} to {stage_dir.name}-last, exiting")
                raise Preempted(PREEMPTED_EXIT)
    finally:
        data_in.close()
    bar.close()
    encode_time = {}
    for part in dist.gather_objects(data_in.skipped):
        encode_time.update(part)
    skipped = _skipped_report(mixture, encode_time)
    if not trained_units and state is None:
        raise nothing_trained(name, data, step, skipped[0][1] if skipped else None)
    if skipped and dist.is_main:
        print(f"[vlmkit] stage {name}: skipped {len(skipped)} bad record(s), e.g. {skipped[0][1]}")
    if len(mixture.sources) > 1 and dist.is_main:
        shares = ", ".join(f"{n}: {s:.3f} (weight {w / sum(mixture.weights):.3f})"
                           for (n, s), w in zip(data_in.shares().items(), mixture.weights))
        print(f"[vlmkit] stage {name}: realised source shares {shares}")
        if logger:
            logger.log({"stage": name, "event": "source_shares", "shares": data_in.shares(),
                        "weights": [w / sum(mixture.weights) for w in mixture.weights]})
    final_dir = stage_dir
    weights = ckpt.model_state(model, ckpt.parts_to_save(model))
    if dist.is_main:
        ckpt.save_checkpoint(stage_dir, model, config, {"stage": name, "step": step, "final": True, "id": uuid.uuid4().hex, **lineage},
                             weights=weights)
        ckpt.remove_periodic(stage_dir)
    dist.barrier()
    return StageResult(name, step, time.perf_counter() - start, losses, skipped, final_dir, model.trainable_parameters(),
                       eval_seconds=eval_seconds)


def _load_weights(model, directory: Path) -> None:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        ckpt.load_weights(model, directory)
        return
    # A sharded model takes whole tensors through the distributed state-dict API.
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, load_file(str(directory / ckpt.WEIGHTS)), options=StateDictOptions(full_state_dict=True, strict=False))


def _divide_gradients(optimizer, divisor: float) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.div_(divisor)


def _clip(model, optimizer, max_norm: float | None) -> torch.Tensor:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


@torch.no_grad()
def _score_pairs(model, dataset: StageDataset, on_device, batch_size: int, num_workers: int, pin: bool) -> torch.Tensor:
    """Sequence log-probs of every (chosen, rejected) pair under the model as it is now, by global
    record index (NaN where a record is unusable)."""
    was_training = model.training
    model.eval()
    out = torch.full((len(dataset.mixture), 2), float("nan"))
    loader = make_loader(dataset, SequentialSampler(len(dataset.mixture), batch_size), num_workers, pin)
    for item in tqdm(loader, desc="reference log-probs", unit="batch", leave=False):
        mb = receive(item, pin)
        if mb.batch is None:
            continue
        batch = on_device(mb)
        logps = sequence_logps(decoder_hidden(model, batch), batch, lm_head(model.llm))[0].float().cpu()
        k = len(mb.indices)
        out[torch.tensor(mb.indices)] = torch.stack([logps[:k], logps[k:]], dim=1)
    model.train(was_training)
    return out


def _check_changed_stages(config: Config, data: dict, on_change: str) -> None:
    """The refusals the stage loop would make for finished stages, made from their checkpoints
    alone, so they come before the model is built."""
    previous = None
    for name in config.train.stages:
        done = Path(config.train.output_dir) / "checkpoints" / name
        if not (done / ckpt.META).is_file():
            return  # this stage trains, and so do the ones after it
        diffs = stage_differences(done, config, name, data[name].sha256, previous)
        if diffs and on_change == "refuse":
            raise _mismatch(name, done, diffs, finished=True)
        if diffs and on_change == "extend":
            _check_extendable(name, diffs)
        if diffs:
            return
        previous = ckpt.read_meta(done).get("id")


def _check_extendable(name: str, diffs: list[str]) -> None:
    model_changed = [d for d in diffs if d.startswith("model.")]
    if model_changed:
        raise ckpt.ResumeMismatchError(
            f"stage {name!r}: --extend continues from the trained weights, which need the same model; "
            "these model settings changed:\n  " + "\n  ".join(model_changed) + "\nUse --restart to train it again.")


def run_training(config: Config, model=None, progress: bool = True, on_change: str = "refuse") -> tuple[object, list[StageResult]]:
    """Run every stage of the recipe in order. Under torchrun, every process runs this; the process
    group comes from the environment.

    A stage whose final checkpoint was written under the same settings, data and earlier stages is
    loaded, not redone. One that differs is refused with a ResumeMismatchError naming what changed
    (`on_change="refuse"`), trained again from the start (`"restart"`), or trained again starting
    from its own trained weights (`"extend"`); the stages after it are then trained again too.
    """
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.train.preflight import check_data, check_model

    if on_change not in ("refuse", "restart", "extend"):
        raise ValueError(f"on_change must be refuse, restart or extend, not {on_change!r}")
    # Checked before joining the process group, so a bad batch size fails fast on every rank.
    world = D.DistContext(world_size=D.world_size_from_env())
    for name, stage in config.train.stages.items():
        D.check_divides(world, name, stage.batch_size)
    # Every data file and image path, and any refusal to reuse a checkpoint, before the (slow) model build.
    if model is None:
        check_model(config)
    data = check_data(config)
    _check_changed_stages(config, data, on_change)
    dist = D.setup(config.train.distributed, config.train.device)
    try:
        seed_everything(config.train.seed)
        out_dir = Path(config.train.output_dir)
        if model is None:
            model = VisionLanguageModel.build(config.model)
        if config.model.init_from:
            ckpt.init_from_checkpoint(model, config.model.init_from)
            if dist.is_main:
                print(f"[vlmkit] model: starting from {config.model.init_from}")
        model.to(D.local_device(dist, config.train.device))
        logger = JsonlLogger(out_dir / "metrics.jsonl") if dist.is_main else None
        results = []
        previous = None  # id of the checkpoint the next stage starts from
        try:
            with _StopFlag() as stop:
                for name, stage in config.train.stages.items():
                    digest = data[name].sha256
                    done = out_dir / "checkpoints" / name
                    extend = False
                    if (done / ckpt.META).is_file():
                        diffs = stage_differences(done, config, name, digest, previous)
                        if not diffs:
                            apply_stage(model, stage)
                            _load_weights(model, done)
                            if dist.is_main:
                                print(f"[vlmkit] stage {name}: already trained, loaded {done}")
                            results.append(StageResult(name, 0, 0.0, checkpoint=done, trainable_parameters=model.trainable_parameters(),
                                                       loaded=True))
                            previous = ckpt.read_meta(done).get("id")
                            continue
                        if on_change == "refuse":
                            raise _mismatch(name, done, diffs, finished=True)
                        if on_change == "extend":
                            _check_extendable(name, diffs)
                        # A stage whose predecessor was retrained starts over: its weights were fitted to the old one.
                        extend = on_change == "extend" and not any(d.startswith("an earlier") for d in diffs)
                        if extend:
                            apply_stage(model, stage)
                            _load_weights(model, done)
                        if dist.is_main:
                            how = f"continuing from {done}" if extend else "training it again from the start"
                            print(f"[vlmkit] stage {name}: settings changed ({'; '.join(d.split(':')[0] for d in diffs)}); {how}")
                    result = train_stage(model, config, name, stage, out_dir, logger, progress, dist, stop, data_sha256=digest,
                                         after=previous, discard_mismatched=on_change != "refuse", data=data[name])
                    result.extended = extend
                    results.append(result)
                    previous = ckpt.read_meta(done).get("id")
        finally:
            if logger:
                logger.close()
        return model, results
    finally:
        dist.close()
