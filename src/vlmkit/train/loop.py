"""The training loop, readable top to bottom.

Per stage: check any checkpoint to resume from against the config (before any work), encode the
stage's data (SFT samples or DPO pairs) so bad records surface up front, cache the frozen vision
tower's features, wrap the model for DDP / FSDP2, then AdamW with warmup + cosine, gradient
accumulation and clipping. Each step's loss is normalised by the whole step's count (all
micro-batches, all ranks), so accumulation, packing and data parallelism all compute the loss
one big batch would. Periodic checkpoints hold weights, optimizer, scheduler, every RNG and the
data position; resuming from one reproduces the uninterrupted run bit for bit on the CPU.
SIGTERM finishes the current step, saves, and exits with status 143.
"""

from __future__ import annotations

import copy
import dataclasses
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
from vlmkit.data.collate import Batch, collate, pack
from vlmkit.data.formats import BadRecordError, Sample, read_llava_records
from vlmkit.model.vlm import IGNORE_INDEX
from vlmkit.processing import build_chat_processor
from vlmkit.processing.prompt import ChatProcessor, EncodedSample
from vlmkit.train import checkpoint as ckpt
from vlmkit.train import distributed as D
from vlmkit.train.losses import decoder_hidden, dpo_loss, sequence_logps, sft_loss_sum, step_normaliser
from vlmkit.train.stages import apply_stage, make_optimizer
from vlmkit.train.telemetry import FlopModel, Telemetry, peak_flops
from vlmkit.utils import JsonlLogger, seed_everything

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


class Preempted(SystemExit):
    """Raised after SIGTERM once the state is saved; exits quietly with status 143."""


def encode_record(processor: ChatProcessor, sample: Sample) -> EncodedSample:
    """`processor.encode`, with any failure a `BadRecordError` naming the record: a template that
    refuses the conversation or a tokenizer that refuses the text is the record's fault too."""
    try:
        return processor.encode(sample)
    except BadRecordError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a record's content can provoke
        raise BadRecordError(sample.id, f"cannot be encoded ({type(e).__name__}: {str(e)[:300]})") from e


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


def last_turn_only(sample: EncodedSample) -> EncodedSample:
    """Keep labels on the final assistant turn only: a DPO response is that turn, and earlier
    assistant turns belong to the shared prompt."""
    supervised = (sample.labels != IGNORE_INDEX).nonzero().flatten()
    labels = torch.full_like(sample.labels, IGNORE_INDEX)
    if supervised.numel():
        # The last turn's tokens are the final contiguous run of supervised positions.
        gaps = (supervised[1:] - supervised[:-1] > 1).nonzero().flatten()
        first = supervised[int(gaps[-1]) + 1] if gaps.numel() else supervised[0]
        labels[first:] = sample.labels[first:]
    return dataclasses.replace(sample, labels=labels)


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


@torch.no_grad()
def cache_vision_features(model, encoded: list[EncodedSample], batch_size: int = 32) -> dict[str, list[torch.Tensor]]:
    """Features of each distinct image (every view) from the frozen tower, computed once for the stage."""
    todo: dict[str, object] = {}
    for s in encoded:
        for key, image in zip(s.image_keys, s.images):
            todo.setdefault(key, image)
    keys = list(todo)
    feats: dict[str, list[torch.Tensor]] = {}
    model.vision.eval()
    for start in tqdm(range(0, len(keys), batch_size), desc="vision features", unit="batch", leave=False):
        chunk = keys[start : start + batch_size]
        out = model.view_features([todo[k] for k in chunk])
        feats.update(zip(chunk, [[f.cpu() for f in views] for views in out]))
    return feats


def _features_for(samples: list[EncodedSample], cache: dict[str, list[torch.Tensor]] | None):
    if cache is None:
        return None
    return [cache[k] for s in samples for k in s.image_keys]


def _micro_batches(n: int, batch_size: int, seed: int, stage: str, min_size: int = 1):
    """Endless micro-batches of indices, reshuffled every epoch from a seed, so the sequence is
    reproducible and a resumed run can skip exactly what it already consumed. An epoch's short
    tail batch is kept, unless it has fewer samples than there are ranks to share it."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + sum(map(ord, stage)))
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            if len(order[i : i + batch_size]) >= min_size:
                yield order[i : i + batch_size]
        epoch += 1


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

def train_stage(model, config: Config, name: str, stage: StageConfig, out_dir: Path, logger: JsonlLogger | None = None,
                progress: bool = True, dist: D.DistContext | None = None, stop: _StopFlag | None = None,
                *, data_sha256: str | None = None, after: str | None = None, discard_mismatched: bool = False) -> StageResult:
    """`data_sha256`, `after`: the data file's digest and the id of the previous stage's
    checkpoint, kept in this stage's checkpoints so a later run can tell what changed.
    `discard_mismatched`: drop a periodic checkpoint written under other settings instead of refusing."""
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
    if stage.packing and config.model.fusion != "prefix":
        raise ValueError(f"stage {name}: packing needs prefix fusion (cross-attention memory is per row, so packed samples would see each other's images)")

    apply_stage(model, stage, tcfg.device)
    processor = build_chat_processor(model, tcfg.max_length)
    dpo = stage.loss == "dpo"
    data_refs = None
    if dpo:
        units, data_refs, skipped = encode_pairs(processor, stage.data, tcfg.on_bad_record, name)
        if stage.dpo.reference == "data" and any(r[0] is None for r in data_refs):
            missing = sum(r[0] is None for r in data_refs)
            raise ValueError(f"stage {name}: dpo.reference=data but {missing} pair(s) carry no ref_chosen_logp/ref_rejected_logp")
    else:
        encoded, skipped = encode_all(processor, read_llava_records(stage.data), tcfg.on_bad_record, name)
        units = [[s] for s in encoded]
    if skipped and dist.is_main:
        print(f"[vlmkit] stage {name}: skipped {len(skipped)} bad record(s), e.g. {skipped[0][1]}")
    flat = [s for u in units for s in u]
    feature_cache = None
    vision_cached = "vision" not in stage.trainable and tcfg.cache_frozen_vision
    if vision_cached:
        with D.unsharded(model):
            feature_cache = cache_vision_features(model, flat)

    # The reference is the policy as it enters the stage: copy or score it before any resume load.
    reference_model, reference_logps = None, None
    if dpo and stage.dpo.reference == "model":
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    elif dpo and stage.dpo.reference == "data":
        reference_logps = torch.tensor(data_refs, dtype=torch.float32)

    per_epoch = math.ceil(len(units) / (stage.batch_size * stage.grad_accum))
    total_steps = stage.max_steps or max(1, math.ceil(per_epoch * stage.epochs))
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    capacity = stage.pack_length or tcfg.max_length

    def make_batch(chosen_units: list[list[EncodedSample]]) -> Batch:
        # DPO: all chosen responses, then all rejected, in one forward.
        samples = [u[0] for u in chosen_units] + ([u[1] for u in chosen_units] if dpo else [])
        feats = _features_for(samples, feature_cache)
        if stage.packing:
            return pack(samples, pad_id, capacity, stage.max_images_per_pack, features=feats).to(device)
        return collate(samples, pad_id, features=feats).to(device)

    state = None
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        _load_weights(model, resume_dir)
    if dpo and stage.dpo.reference == "precompute":
        if state is not None and "reference_logps" in state:
            reference_logps = state["reference_logps"]
        else:
            reference_logps = _score_pairs(model, units, make_batch, stage.batch_size)

    wrapped = D.wrap(model, dist)
    optimizer, scheduler = make_optimizer(model, stage, total_steps)
    step, losses = 0, []
    if state is not None:
        D.load_optimizer_state(model, optimizer, state["optimizer"], dist)
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
        if dist.is_main:
            print(f"[vlmkit] stage {name}: resuming at step {step}/{total_steps} from {resume_dir}")
    if logger and dist.is_main:
        # Steps logged after the checkpoint (or before a first one) are about to be redone.
        logger.drop(lambda r: r.get("stage") == name and isinstance(r.get("step"), int) and r["step"] > step)

    def save_periodic() -> None:
        weights = ckpt.model_state(model, ckpt.parts_to_save(model))
        optim_state = D.full_optimizer_state(model, optimizer, dist)
        rngs = dist.gather_objects(ckpt.rng_state())
        if dist.is_main:
            trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "step": step, "losses": losses,
                             "rng": rngs, "micro_batches_consumed": step * stage.grad_accum, "units": len(units)}
            if reference_logps is not None:
                trainer_state["reference_logps"] = reference_logps
            ckpt.rotate_and_save(stage_dir, step, tcfg.keep_last, lambda path: ckpt.save_checkpoint(
                path, model, config, {"stage": name, "step": step, **lineage}, trainer_state, weights=weights))
        dist.barrier()

    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    micro_batches = _micro_batches(len(units), stage.batch_size, tcfg.seed, name, min_size=dist.world_size)
    # Skip what a resumed run already consumed, so the data order matches an uninterrupted run.
    for _ in range(step * stage.grad_accum):
        next(micro_batches)
    flop_model = FlopModel.of(model, stage.trainable, vision_cached)
    telemetry = Telemetry(device, peak_flops(device, tcfg.peak_tflops))
    bar = tqdm(total=total_steps, initial=step, desc=f"stage {name}", unit="step", disable=not (progress and dist.is_main))
    start = time.perf_counter()
    while step < total_steps:
        telemetry.reset()
        optimizer.zero_grad(set_to_none=True)
        micro = [next(micro_batches) for _ in range(stage.grad_accum)]
        # The whole step's count, known from the labels alone: the same on every rank.
        if dpo:
            normaliser = sum(len(idx) for idx in micro)
        else:
            counts = torch.tensor([int((u[0].labels[1:] != IGNORE_INDEX).sum()) for idx in micro for u in (units[i] for i in idx)])
            normaliser = step_normaliser(counts, stage.loss_reduction)
        stats = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "images": 0.0, "supervised": 0.0, "flops": 0.0,
                 "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_accuracy": 0.0}
        for m, indices in enumerate(micro):
            mine = indices[dist.shard(len(indices))] if dist.enabled else indices
            batch = make_batch([units[i] for i in mine])
            telemetry.data_done()
            sync = m == len(micro) - 1 or not hasattr(wrapped, "no_sync")
            with (wrapped.no_sync() if not sync else _nullcontext()), autocast:
                hidden = decoder_hidden(wrapped, batch)
                logps, n_targets = sequence_logps(hidden, batch, model.llm.get_output_embeddings())
                if dpo:
                    k = len(mine)
                    ref = _reference(reference_model, reference_logps, batch, mine, device)
                    terms = dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], stage.dpo.beta, stage.dpo.label_smoothing)
                    loss_sum = terms.losses.sum()
                    stats["chosen_reward"] += float(terms.chosen_rewards.sum())
                    stats["rejected_reward"] += float(terms.rejected_rewards.sum())
                    stats["reward_accuracy"] += float((terms.chosen_rewards > terms.rejected_rewards).float().sum())
                else:
                    loss_sum = sft_loss_sum(logps, n_targets, stage.loss_reduction)
            # DDP and FSDP average gradients over ranks; the world-size factor undoes that.
            (loss_sum * (dist.world_size / max(1, normaliser))).backward()
            stats["loss"] += float(loss_sum.detach()) / max(1, normaliser)
            lengths = [int(x) for x in torch.bincount(batch.segments[batch.segments >= 0], minlength=len(batch.ids))]
            stats["tokens"] += sum(lengths)
            stats["padded"] += batch.input_ids.numel() - sum(lengths)
            stats["images"] += batch.num_images
            stats["supervised"] += int(n_targets.sum())
            stats["flops"] += flop_model.step_flops(lengths, int(n_targets.sum()), batch.num_images)
            telemetry.compute_done()
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
            if dpo:
                pairs = sum(len(idx) for idx in micro)
                record.update({"chosen_reward": totals["chosen_reward"] / pairs, "rejected_reward": totals["rejected_reward"] / pairs,
                               "reward_margin": (totals["chosen_reward"] - totals["rejected_reward"]) / pairs,
                               "reward_accuracy": totals["reward_accuracy"] / pairs})
            logger.log(record)
        preempted = stop is not None and dist.any(stop.set)
        if step < total_steps and (preempted or (tcfg.save_every and step % tcfg.save_every == 0)):
            save_periodic()
        if preempted and step < total_steps:
            bar.close()
            if dist.is_main:
                print(f"[vlmkit] stage {name}: SIGTERM received; saved step {step} to {stage_dir.name}-last, exiting")
            raise Preempted(PREEMPTED_EXIT)
    bar.close()
    final_dir = stage_dir
    weights = ckpt.model_state(model, ckpt.parts_to_save(model))
    if dist.is_main:
        ckpt.save_checkpoint(stage_dir, model, config, {"stage": name, "step": step, "final": True, "id": uuid.uuid4().hex, **lineage},
                             weights=weights)
        ckpt.remove_periodic(stage_dir)
    dist.barrier()
    return StageResult(name, step, time.perf_counter() - start, losses, skipped, final_dir, model.trainable_parameters())


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _load_weights(model, directory: Path) -> None:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        ckpt.load_weights(model, directory)
        return
    # A sharded model takes whole tensors through the distributed state-dict API.
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, load_file(str(directory / ckpt.WEIGHTS)), options=StateDictOptions(full_state_dict=True, strict=False))


def _clip(model, optimizer, max_norm: float | None) -> torch.Tensor:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def _reference(reference_model, reference_logps, batch: Batch, unit_indices: list[int], device) -> torch.Tensor:
    """Reference log-probs for the batch's sequences (chosen first, then rejected)."""
    if reference_model is not None:
        with torch.no_grad():
            hidden = decoder_hidden(reference_model, batch)
            return sequence_logps(hidden, batch, reference_model.llm.get_output_embeddings())[0]
    idx = torch.tensor(unit_indices)
    return torch.cat([reference_logps[idx, 0], reference_logps[idx, 1]]).to(device)


@torch.no_grad()
def _score_pairs(model, units, make_batch, batch_size: int) -> torch.Tensor:
    """Sequence log-probs of every (chosen, rejected) pair under the model as it is now."""
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(units), batch_size), desc="reference log-probs", unit="batch", leave=False):
        chunk = units[start : start + batch_size]
        batch = make_batch(chunk)
        logps = sequence_logps(decoder_hidden(model, batch), batch, model.llm.get_output_embeddings())[0].float().cpu()
        k = len(chunk)
        out.append(torch.stack([logps[:k], logps[k:]], dim=1))
    model.train(was_training)
    return torch.cat(out)


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
                                         after=previous, discard_mismatched=on_change != "refuse")
                    result.extended = extend
                    results.append(result)
                    previous = ckpt.read_meta(done).get("id")
        finally:
            if logger:
                logger.close()
        return model, results
    finally:
        dist.close()
