"""The training loop, readable top to bottom.

`run_training` runs a recipe's stages in order; a stage already trained under the same settings
is loaded instead (the policy is in `resume.py`). `run_stage` is one stage: set up, step until
done, save. Set-up checks any checkpoint to resume from against the config (before any work),
takes the stage's indexed data (records located, not decoded), wraps the model for DDP / FSDP2,
then builds AdamW with warmup + cosine. Micro-batches are read and encoded on demand by DataLoader
workers (`StageInput`); a frozen vision tower's features come from `FrozenFeatures` (on disk when
enabled). `train_step` is one optimizer step: each micro-batch's `forward_backward`, clipping, the
update and the schedule. The stage's `Objective` (SFT, DPO, embed-align, GRPO) builds the loss and
reports its own metrics.

Each step's loss is normalised by the whole step's count (all micro-batches, all ranks), so
accumulation, packing and data parallelism all compute the loss one big batch would. Periodic
checkpoints hold weights, optimizer, scheduler, every RNG and the data position; resuming from one
reproduces the uninterrupted run bit for bit on the CPU. SIGTERM says at once that it will save,
finishes the current step, saves, and exits with status 143.

Every metrics record goes to `metrics.jsonl` and to the libraries of `train.report_to`
(`reporting.py`); when a stage ends, its loss and held-out curves are drawn into its checkpoint
folder (`plots.py`).
"""

from __future__ import annotations

import collections
import math
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit import checkpoint as ckpt
from vlmkit.config import Config, StageConfig
from vlmkit.core.precision import bf16_slowdown, native_bf16
from vlmkit.data.formats import BadRecordError, Sample
from vlmkit.data.pipeline import (
    MicroBatch,
    SequentialSampler,
    StageDataset,
    StageInput,
    encode_record,
    last_turn_only,
    make_loader,
    receive,
)
from vlmkit.data.preference import read_preference_file
from vlmkit.data.sources import Mixture
from vlmkit.model.language import non_attention_mixers
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.processing.prompt import ChatProcessor, EncodedSample
from vlmkit.train import distributed as D
from vlmkit.train import resume
from vlmkit.train.features import FrozenFeatures
from vlmkit.train.heldout import HeldOutEval
from vlmkit.train.objectives import OBJECTIVES, Objective
from vlmkit.train.plots import plot_stage
from vlmkit.train.preflight import (
    StageData,
    StageGuardWarning,
    check_data,
    check_heldout,
    check_model,
    check_skip_rate,
    check_stage_data,
    nothing_trained,
    stage_guard_warnings,
)
from vlmkit.train.reporting import MetricsLog, check_installed
from vlmkit.train.stages import apply_stage, make_optimizer
from vlmkit.train.telemetry import FlopModel, Telemetry, peak_flops
from vlmkit.utils import JsonlLogger, seed_everything

# Micro-batches of one optimizer step read before its first forward (see `train_step`); a
# longer `grad_accum` streams its micro-batches instead of holding them all.
GATHERED_MICRO_BATCHES = 32

# Exit status after a SIGTERM-triggered save: the conventional 128 + SIGTERM.
PREEMPTED_EXIT = 128 + signal.SIGTERM

# The per-step sums every objective's steps count (an objective adds its own `stat_keys`).
STEP_SUMS = ("loss", "tokens", "padded", "images", "supervised", "flops", "units")


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
    heldout: dict | None = None  # the stage's last held-out scores (`train.eval`): benchmark, items, overall, breakdown
    plots: list[Path] = field(default_factory=list)  # loss.png (and heldout.png) in the stage's checkpoint folder


class Preempted(SystemExit):
    """Raised after SIGTERM once the state is saved; exits quietly with status 143."""


@dataclass
class StageRun:
    """One stage being trained: what `set_up_stage` builds, and the progress its steps make."""

    name: str
    stage: StageConfig
    config: Config
    dist: D.DistContext
    model: VisionLanguageModel
    wrapped: torch.nn.Module  # the model as DDP / FSDP2 wrapped it (the model itself in one process)
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: StageData
    data_in: StageInput
    on_device: Callable[[MicroBatch], object]
    features: FrozenFeatures | None
    heldout: HeldOutEval | None
    stage_dir: Path
    lineage: dict  # kept in the stage's checkpoints: the previous stage's checkpoint id, the data's digest
    total_steps: int
    resumed: bool
    autocast: torch.autocast
    flop_model: FlopModel
    telemetry: Telemetry
    step: int = 0
    losses: list[float] = field(default_factory=list)
    trained_units: float = 0.0
    skips_checked: int = 0
    eval_seconds: float = 0.0
    heldout_scores: dict | None = None  # the latest held-out check's

    @property
    def mixture(self) -> Mixture:
        return self.data.mixture


# ---- the recipe -------------------------------------------------------------------------------

def warn_emulated_bf16(precision: str, device: str) -> None:
    """A recipe that forces bf16 on a CPU without native bf16 trains many times slower than fp32:
    say so at the start, with the slowdown measured on this CPU."""
    if precision != "bf16" or not device.startswith("cpu") or native_bf16(device):
        return
    warnings.warn(f"train.precision is bf16, but this CPU has no native bf16 (AVX512-BF16 or AMX): a bf16 matmul "
                  f"runs {bf16_slowdown():.0f}x slower than fp32 here. Use train.precision=auto (fp32 on this CPU) "
                  "unless you mean to match a bf16 run.", stacklevel=2)


def run_training(config: Config, model=None, progress: bool = True, on_change: str = "refuse") -> tuple[object, list[StageResult]]:
    """Run every stage of the recipe in order. Under torchrun, every process runs this; the process
    group comes from the environment.

    A stage whose final checkpoint was written under the same settings, data and earlier stages is
    loaded, not redone. One that differs is refused with a ResumeMismatchError naming what changed
    (`on_change="refuse"`), trained again from the start (`"restart"`), or trained again starting
    from its own trained weights (`"extend"`); the stages after it are then trained again too.
    """
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
    check_heldout(config)
    check_installed(config.train.report_to)
    for warning in stage_guard_warnings(config, data, getattr(model, "pretrained_parts", None)):
        warnings.warn(warning, StageGuardWarning, stacklevel=2)
    resume.check_changed_stages(config, data, on_change)
    warn_emulated_bf16(config.train.precision, config.train.device)
    dist = D.setup(config.train.distributed, config.train.device)
    try:
        seed_everything(config.train.seed)
        model = _starting_model(config, model, dist)
        logger = MetricsLog(Path(config.train.output_dir) / "metrics.jsonl", config) if dist.is_main else None
        try:
            with _StopFlag(announce=dist.is_main) as stop:
                results = _run_stages(model, config, data, on_change, logger, progress, dist, stop)
        finally:
            if logger:
                logger.close()
        return model, results
    finally:
        dist.close()


def _starting_model(config: Config, model, dist: D.DistContext):
    if model is None:
        model = VisionLanguageModel.build(config.model)
    if config.model.init_from:
        ckpt.init_from_checkpoint(model, config.model.init_from)
        if dist.is_main:
            print(f"[vlmkit] model: starting from {config.model.init_from}")
    model.to(D.local_device(dist, config.train.device))
    return model


def _run_stages(model, config: Config, data: dict[str, StageData], on_change: str, logger: JsonlLogger | None,
                progress: bool, dist: D.DistContext, stop: _StopFlag) -> list[StageResult]:
    """Each stage in turn: loaded when already trained under the same settings, else trained."""
    out_dir = Path(config.train.output_dir)
    results = []
    previous = None  # id of the checkpoint the next stage starts from
    for name, stage in config.train.stages.items():
        done = out_dir / "checkpoints" / name
        plan, diffs = resume.finished_stage(done, config, name, data[name].sha256, previous, on_change)
        if plan == "load":
            apply_stage(model, stage)
            resume.load_weights(model, done)
            if dist.is_main:
                print(f"[vlmkit] stage {name}: already trained, loaded {done}")
            results.append(StageResult(name, 0, 0.0, checkpoint=done, trainable_parameters=model.trainable_parameters(), loaded=True))
        else:
            if plan == "extend":
                apply_stage(model, stage)
                resume.load_weights(model, done)
            if plan != "train" and dist.is_main:
                how = f"continuing from {done}" if plan == "extend" else "training it again from the start"
                print(f"[vlmkit] stage {name}: settings changed ({'; '.join(d.split(':')[0] for d in diffs)}); {how}")
            result = run_stage(model, config, name, stage, out_dir, logger, progress, dist, stop, data_sha256=data[name].sha256,
                               after=previous, discard_mismatched=on_change != "refuse", data=data[name])
            result.extended = plan == "extend"
            results.append(result)
        previous = ckpt.read_meta(done).get("id")
    return results


# ---- one stage --------------------------------------------------------------------------------

def run_stage(model, config: Config, name: str, stage: StageConfig, out_dir: Path, logger: JsonlLogger | None = None,
              progress: bool = True, dist: D.DistContext | None = None, stop: _StopFlag | None = None,
              *, data_sha256: str | None = None, after: str | None = None, discard_mismatched: bool = False,
              data: StageData | None = None) -> StageResult:
    """Train one stage: set up (resuming from a periodic checkpoint when there is one), take
    optimizer steps until done (saving periodically, and on SIGTERM before exiting), then save the
    stage's final checkpoint.

    `data_sha256`, `after`: the data file's digest and the id of the previous stage's
    checkpoint, kept in this stage's checkpoints so a later run can tell what changed.
    `discard_mismatched`: drop a periodic checkpoint written under other settings instead of refusing.
    `data`: the stage's indexed data from the preflight check (indexed here when not given)."""
    dist = dist or D.DistContext()
    run = set_up_stage(model, config, name, stage, out_dir, logger, dist, data_sha256=data_sha256, after=after,
                       discard_mismatched=discard_mismatched, data=data)
    bar = tqdm(total=run.total_steps, initial=run.step, desc=f"stage {name}", unit="step", disable=not (progress and dist.is_main))
    start = time.perf_counter()
    try:
        while run.step < run.total_steps:
            grad_norm, totals = train_step(run)
            _check_encode_skips(run)
            postfix = _report_step(run, bar, logger, grad_norm, totals, start)
            if run.heldout is not None and run.heldout.due(run.step, run.total_steps):
                _held_out_eval(run, bar, logger, postfix)
            _save_or_stop(run, stop, bar)
    finally:
        run.data_in.close()
    bar.close()
    return _finish_stage(run, logger, start)


def set_up_stage(model, config: Config, name: str, stage: StageConfig, out_dir: Path, logger: JsonlLogger | None,
                 dist: D.DistContext, *, data_sha256: str | None, after: str | None, discard_mismatched: bool,
                 data: StageData | None) -> StageRun:
    """Everything a stage's steps need, in an order that matters: refusals before any work; the
    objective's set-up on the model as it enters the stage, then any resume; the data position last."""
    tcfg = config.train
    device = torch.device(D.local_device(dist, tcfg.device))
    D.check_divides(dist, name, stage.batch_size)
    stage_dir = out_dir / "checkpoints" / name
    resume_dir = resume.resumable_checkpoint(stage_dir, config, name, dist, data_sha256, after, discard_mismatched)
    OBJECTIVES[stage.loss].check(name, config, dist)
    if stage.packing and config.model.fusion != "prefix":
        raise ValueError(f"stage {name}: packing needs prefix fusion (cross-attention memory is per row, so packed samples would see each other's images)")
    if stage.packing and (mixers := non_attention_mixers(model.llm)):
        raise ValueError(f"stage {name}: packing isolates samples only inside attention, and the LLM's {', '.join(mixers)} layers "
                         "mix neighbouring tokens across a row's samples; set packing: false")

    apply_stage(model, stage)
    processor = build_chat_processor(model, tcfg.max_length)
    data = data if data is not None and data.mixture is not None else check_stage_data(name, stage, tcfg.on_bad_record, tcfg.max_skip_fraction)
    objective = OBJECTIVES[stage.loss].for_stage(name, stage, model, data.mixture)
    if data.unusable and dist.is_main:
        print(f"[vlmkit] stage {name}: leaving out {data.unusable} unusable record(s), e.g. "
              f"{next(b for s in data.mixture.sources for b in s.bad).message}")
    features = _frozen_features(model, stage, tcfg, out_dir)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    dataset = StageDataset(data.mixture, processor, dpo=objective.pairs, pad_id=pad_id, packing=stage.packing,
                           capacity=stage.pack_length or tcfg.max_length, max_images=stage.max_images_per_pack,
                           image_keys=features is not None and features.dir is not None, keep_samples=objective.keeps_samples)
    pin = device.type == "cuda"
    on_device = _on_device(device, features)
    total_steps = _total_steps(stage, len(data.mixture))

    state = None
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        resume.load_weights(model, resume_dir)
    objective.start(model, state, lambda desc: _in_order(dataset, on_device, stage.batch_size, tcfg.num_workers, pin, desc))
    wrapped = dist.strategy.wrap(model, dist)
    optimizer, scheduler = make_optimizer(model, stage, total_steps)
    step, losses = _restore(name, model, optimizer, scheduler, dist, state, resume_dir, total_steps)
    if logger and dist.is_main:
        # Steps logged after the checkpoint (or before a first one) are about to be redone.
        logger.drop(lambda r: r.get("stage") == name and isinstance(r.get("step"), int) and r["step"] > step)

    # Skip what a resumed run already consumed, so the data order matches an uninterrupted run.
    data_in = StageInput(dataset, stage.batch_size, tcfg.seed, name, dist.rank, dist.world_size, tcfg.num_workers, pin,
                         tcfg.prefetch, tcfg.on_bad_record, consumed=step * stage.grad_accum,
                         source_counts=state.get("source_counts") if state is not None else None)
    if state is not None:
        data_in.skipped.update({int(g): (rid, msg) for g, rid, msg in state.get("skipped", [])})
    heldout = None
    if tcfg.eval is not None and dist.is_main and not dist.enabled and (tcfg.eval.stages is None or name in tcfg.eval.stages):
        heldout = HeldOutEval(tcfg.eval, bf16=tcfg.precision == "bf16")

    model.train()
    return StageRun(name, stage, config, dist, model, wrapped, objective, optimizer, scheduler, data, data_in, on_device, features,
                    heldout, stage_dir, {"after": after, "data_sha256": data_sha256}, total_steps, resumed=state is not None,
                    autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"),
                    flop_model=FlopModel.of(model, stage.trainable, features is not None),
                    telemetry=Telemetry(device, peak_flops(device, tcfg.peak_tflops)),
                    step=step, losses=losses, skips_checked=len(data_in.skipped))


def _frozen_features(model, stage: StageConfig, tcfg, out_dir: Path) -> FrozenFeatures | None:
    """The frozen vision tower's features, computed once per image (kept on disk when enabled)."""
    if "vision" in stage.trainable or not tcfg.cache_frozen_vision:
        return None
    cache_dir = None
    if tcfg.feature_cache:
        cache_dir = Path(tcfg.feature_cache_dir) if tcfg.feature_cache_dir else out_dir / "feature_cache"
    return FrozenFeatures(model, cache_dir, int(tcfg.feature_cache_gb * 1e9), bf16=tcfg.precision == "bf16")


def _on_device(device: torch.device, features: FrozenFeatures | None):
    def on_device(mb: MicroBatch):
        batch = mb.batch.to(device)
        if features is not None:
            batch.image_features = features.features(batch, mb.image_keys)
        return batch

    return on_device


def _total_steps(stage: StageConfig, units: int) -> int:
    per_epoch = math.ceil(units / (stage.batch_size * stage.grad_accum))
    return stage.max_steps or max(1, math.ceil(per_epoch * stage.epochs))


def _in_order(dataset: StageDataset, on_device, batch_size: int, num_workers: int, pin: bool, desc: str):
    """Every micro-batch of the stage's data once, in record order, on the device (those with no
    usable record left out)."""
    loader = make_loader(dataset, SequentialSampler(len(dataset.mixture), batch_size), num_workers, pin)
    for item in tqdm(loader, desc=desc, unit="batch", leave=False):
        mb = receive(item, pin)
        if mb.batch is not None:
            yield mb, on_device(mb)


def _restore(name: str, model, optimizer, scheduler, dist: D.DistContext, state: dict | None, resume_dir: Path | None,
             total_steps: int) -> tuple[int, list[float]]:
    """The step and losses to go on from: a periodic checkpoint's, with its optimizer, scheduler
    and RNG states loaded; (0, []) for a fresh start."""
    if state is None:
        return 0, []
    dist.strategy.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step, losses = int(state["step"]), list(state["losses"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    if dist.is_main:
        print(f"[vlmkit] stage {name}: resuming at step {step}/{total_steps} from {resume_dir}")
    return step, losses


# ---- one step ---------------------------------------------------------------------------------

def train_step(run: StageRun) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step: every micro-batch's forward and backward, clipping, the update and the
    schedule. Returns the gradient norm and the step's sums over all ranks (`loss` is the step's loss).

    A step of up to GATHERED_MICRO_BATCHES micro-batches is read whole first, so its count (all
    micro-batches, all ranks) is known before any backward and scales each one. A longer
    accumulation streams: each micro-batch is read, run and let go in turn, and the summed
    gradients are divided by the count once it is known (the same up to rounding)."""
    run.telemetry.reset()
    run.optimizer.zero_grad(set_to_none=True)
    accum, objective = run.stage.grad_accum, run.objective
    ahead = collections.deque(run.data_in.next() for _ in range(min(accum, GATHERED_MICRO_BATCHES)))
    streamed = len(ahead) < accum
    normaliser = 1.0 if streamed else run.dist.all_sum([objective.local_normaliser(list(ahead))])[0]
    streamed_normaliser, loss_sums = 0.0, []
    stats = dict.fromkeys((*STEP_SUMS, *objective.stat_keys), 0.0)
    for m in range(accum):
        mb = ahead.popleft() if ahead else run.data_in.next()
        if streamed:
            streamed_normaliser += objective.local_normaliser([mb])
        if mb.batch is not None:
            loss_sums.append(forward_backward(run, mb, normaliser, last=m == accum - 1, stats=stats))
        elif run.dist.enabled:
            raise RuntimeError(f"stage {run.name} step {run.step + 1}: every record of this rank's share of a micro-batch was "
                               "unusable; with data parallelism, fix or remove the bad records (or use a larger batch)")
    if streamed:
        (normaliser,) = run.dist.all_sum([streamed_normaliser])
        _divide_gradients(run.optimizer, max(1, normaliser))
    for loss_sum in loss_sums:
        stats["loss"] += loss_sum / max(1, normaliser)
    grad_norm = _clip(run.model, run.optimizer, run.stage.max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"stage {run.name} step {run.step}: non-finite gradient norm ({grad_norm})")
    run.optimizer.step()
    run.scheduler.step()
    run.telemetry.compute_done()
    run.step += 1
    keys = list(stats)
    totals = dict(zip(keys, run.dist.all_sum([stats[k] for k in keys])))
    totals["ranks"] = run.dist.world_size
    run.trained_units += totals["units"]
    return grad_norm, totals


def forward_backward(run: StageRun, mb: MicroBatch, normaliser: float, last: bool, stats: dict[str, float]) -> float:
    """One micro-batch: the objective's loss, its backward scaled by the step's normaliser, and its
    counts added to `stats`. `last`: the step's last micro-batch (DDP syncs gradients on it).
    Returns the micro-batch's loss sum."""
    batch = run.on_device(mb)
    run.telemetry.data_done()
    with run.dist.strategy.no_sync(run.wrapped, last=last), run.autocast:
        loss_sum, n_targets = run.objective.loss(run.wrapped, run.model, batch, mb, stats)
    # DDP and FSDP average gradients over ranks; the world-size factor undoes that.
    (loss_sum * (run.dist.world_size / max(1, normaliser))).backward()
    value = float(loss_sum.detach())
    lengths = [int(x) for x in torch.bincount(batch.segments[batch.segments >= 0], minlength=len(batch.ids))]
    stats["tokens"] += sum(lengths)
    stats["padded"] += batch.input_ids.numel() - sum(lengths)
    stats["images"] += batch.num_images
    stats["supervised"] += int(n_targets.sum())
    stats["units"] += len(mb.indices)
    stats["flops"] += run.flop_model.step_flops(lengths, int(n_targets.sum()), batch.num_images)
    run.telemetry.compute_done()
    return value


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


# ---- after a step: checks, metrics, held-out evaluation, checkpoints ---------------------------

def _check_encode_skips(run: StageRun) -> None:
    """Refuse the run once the records found unusable while encoding pass `train.max_skip_fraction`."""
    if run.dist.any(len(run.data_in.skipped) > run.skips_checked):
        run.skips_checked = len(run.data_in.skipped)
        max_fraction = run.config.train.max_skip_fraction
        check_skip_rate(run.name, run.data, max_fraction, *_encode_skips(run.dist, run.data_in, run.data, max_fraction))


def _report_step(run: StageRun, bar, logger: JsonlLogger | None, grad_norm: torch.Tensor, totals: dict[str, float],
                 start: float) -> dict[str, str]:
    """The step's loss and rates on the progress bar and, every `log_every` steps, in metrics.jsonl
    (with the objective's own metrics). Returns the bar's postfix."""
    step_loss = totals["loss"]
    run.losses.append(step_loss)
    rates = run.telemetry.record(totals)
    postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{rates['tokens_per_s']:.0f}", "data": f"{rates['data_share']:.0%}"}
    if "mfu" in rates:
        postfix["mfu"] = f"{rates['mfu']:.1%}"
    bar.set_postfix(postfix)
    bar.update()
    if not (logger and run.dist.is_main and run.step % run.config.train.log_every == 0):
        return postfix
    record = {"stage": run.name, "step": run.step, "loss": step_loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
              "supervised_tokens": int(totals["supervised"]), "tokens": int(totals["tokens"]), "images": int(totals["images"]),
              "elapsed_s": time.perf_counter() - start, "world_size": run.dist.world_size, **rates}
    if len(run.mixture.sources) > 1:
        record["source_shares"] = run.data_in.shares()
    if run.data_in.skipped:
        record["skipped_records"] = len(run.data_in.skipped)
    if run.features is not None and run.features.dir is not None:
        record.update(run.features.stats())
    record.update(run.objective.metrics(totals))
    logger.log(record)
    return postfix


def _held_out_eval(run: StageRun, bar, logger: JsonlLogger | None, postfix: dict[str, str]) -> None:
    scores = run.heldout.run(run.model)
    run.eval_seconds += scores["eval_s"]
    run.heldout_scores = scores
    bar.set_postfix({**postfix, "held-out": f"{scores['overall']:.0%}"})
    if logger:
        logger.log({"stage": run.name, "step": run.step, **scores})


def _save_or_stop(run: StageRun, stop: _StopFlag | None, bar) -> None:
    """Save a periodic checkpoint when one is due or SIGTERM came (on any rank); after SIGTERM, exit."""
    preempted = stop is not None and run.dist.any(stop.set)
    every = run.config.train.save_every
    if run.step < run.total_steps and (preempted or (every and run.step % every == 0)):
        _save_periodic(run)
    if preempted and run.step < run.total_steps:
        bar.close()
        if run.dist.is_main:
            print(f"[vlmkit] stage {run.name}: SIGTERM received; saved step {run.step} to {run.stage_dir.name}-last, exiting")
        raise Preempted(PREEMPTED_EXIT)


def _save_periodic(run: StageRun) -> None:
    """Weights, optimizer, scheduler, every rank's RNG, the data position and the objective's own
    state, as `<stage>-last` (older ones rotated out past `train.keep_last`)."""
    model, dist = run.model, run.dist
    weights = ckpt.model_state(model, ckpt.parts_to_save(model))
    optim_state = dist.strategy.full_optimizer_state(model, run.optimizer)
    rngs = dist.gather_objects(ckpt.rng_state())
    skipped = [row for rows in dist.gather_objects([(g, *v) for g, v in run.data_in.skipped.items()]) for row in rows]
    if dist.is_main:
        trainer_state = {"optimizer": optim_state, "scheduler": run.scheduler.state_dict(), "step": run.step, "losses": run.losses,
                         "rng": rngs, "micro_batches_consumed": run.data_in.consumed, "units": len(run.mixture),
                         "source_counts": run.data_in.source_counts, "skipped": skipped, **run.objective.state()}
        meta = {"stage": run.name, "step": run.step, **run.lineage}
        ckpt.rotate_and_save(run.stage_dir, run.step, run.config.train.keep_last, lambda path: ckpt.save_checkpoint(
            path, model, run.config, meta, trainer_state, weights=weights))
    dist.barrier()


def _finish_stage(run: StageRun, logger: JsonlLogger | None, start: float) -> StageResult:
    """Report the records left out and the realised source shares, save the final checkpoint and
    drop the periodic ones."""
    dist, name, mixture = run.dist, run.name, run.mixture
    encode_time = {}
    for part in dist.gather_objects(run.data_in.skipped):
        encode_time.update(part)
    skipped = _skipped_report(mixture, encode_time)
    if not run.trained_units and not run.resumed:
        raise nothing_trained(name, run.data, run.step, skipped[0][1] if skipped else None)
    if skipped and dist.is_main:
        print(f"[vlmkit] stage {name}: skipped {len(skipped)} bad record(s), e.g. {skipped[0][1]}")
    if len(mixture.sources) > 1 and dist.is_main:
        shares = ", ".join(f"{n}: {s:.3f} (weight {w / sum(mixture.weights):.3f})"
                           for (n, s), w in zip(run.data_in.shares().items(), mixture.weights))
        print(f"[vlmkit] stage {name}: realised source shares {shares}")
        if logger:
            logger.log({"stage": name, "event": "source_shares", "shares": run.data_in.shares(),
                        "weights": [w / sum(mixture.weights) for w in mixture.weights]})
    weights = ckpt.model_state(run.model, ckpt.parts_to_save(run.model))
    if dist.is_main:
        meta = {"stage": name, "step": run.step, "final": True, "id": uuid.uuid4().hex, **run.lineage}
        ckpt.save_checkpoint(run.stage_dir, run.model, run.config, meta, weights=weights)
        ckpt.remove_periodic(run.stage_dir)
    plots = plot_stage(logger.path, name, run.stage_dir) if logger and dist.is_main else []
    dist.barrier()
    return StageResult(name, run.step, time.perf_counter() - start, run.losses, skipped, run.stage_dir,
                       run.model.trainable_parameters(), eval_seconds=run.eval_seconds, heldout=run.heldout_scores, plots=plots)


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


# ---- SIGTERM ----------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (a signal handler must not save). The
    first SIGTERM is acknowledged at once (`announce`: on this process), since the step under
    way may take a minute to end."""

    def __init__(self, announce: bool = True):
        self.set = False
        self.announce = announce
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.set and self.announce:
            _say_now("[vlmkit] SIGTERM received: saving a checkpoint after the current step ends, then exiting\n")
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _say_now(message: str) -> None:
    """Write to stderr from a signal handler: straight to the file descriptor, since the handler
    may run while the main thread is inside a write to the same buffered stream (Python then
    raises "reentrant call"). stderr is line-buffered, so nothing written earlier comes after."""
    try:
        os.write(sys.stderr.fileno(), message.encode())
    except (AttributeError, OSError, ValueError):  # no real file descriptor (a captured stream)
        try:
            sys.stderr.write(message)
        except RuntimeError:
            pass


# ---- up-front encoding ------------------------------------------------------------------------
# The loop encodes on demand (`StageInput`); these encode a whole file at once, so every bad record
# surfaces together.

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
