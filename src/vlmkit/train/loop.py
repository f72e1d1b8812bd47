"""The training loop, readable top to bottom: encode the stage's data, (optionally) cache the
frozen vision tower's features, then AdamW with warmup + cosine, gradient accumulation and
clipping, JSONL metrics, a progress bar and atomic checkpoints that training resumes from."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.config import Config, StageConfig
from vlmkit.data.collate import collate
from vlmkit.data.formats import BadRecordError, Sample, read_llava_json
from vlmkit.processing import build_chat_processor
from vlmkit.processing.prompt import ChatProcessor, EncodedSample
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.stages import apply_stage, make_optimizer
from vlmkit.utils import JsonlLogger, seed_everything


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # record id -> reason
    checkpoint: Path | None = None
    trainable_parameters: dict[str, int] = field(default_factory=dict)


def encode_all(processor: ChatProcessor, samples: list[Sample], on_bad: str, desc: str) -> tuple[list[EncodedSample], dict[str, str]]:
    """Encode every sample up front, so a bad record surfaces before any step is taken."""
    encoded, skipped = [], {}
    for sample in tqdm(samples, desc=f"encode {desc}", unit="sample", leave=False):
        try:
            encoded.append(processor.encode(sample))
        except BadRecordError as e:
            if on_bad == "error":
                raise
            skipped[sample.id] = str(e)
    if not encoded:
        raise ValueError(f"stage {desc}: no usable records ({len(skipped)} skipped)")
    return encoded, skipped


@torch.no_grad()
def cache_vision_features(model, encoded: list[EncodedSample], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Features of each distinct image from the frozen tower, computed once for the stage."""
    todo: dict[str, torch.Tensor] = {}
    for s in encoded:
        for k, key in enumerate(s.image_keys):
            todo.setdefault(key, s.pixel_values[k : k + 1])
    keys = list(todo)
    feats: dict[str, torch.Tensor] = {}
    model.vision.eval()
    for start in tqdm(range(0, len(keys), batch_size), desc="vision features", unit="batch", leave=False):
        chunk = keys[start : start + batch_size]
        out = model.vision_features(torch.cat([todo[k] for k in chunk])).cpu()
        feats.update(zip(chunk, out))
    return feats


def _features_for(samples: list[EncodedSample], cache: dict[str, torch.Tensor] | None):
    if cache is None:
        return None
    return [cache[k].unsqueeze(0) for s in samples for k in s.image_keys]


def train_stage(model, config: Config, name: str, stage: StageConfig, out_dir: Path, logger: JsonlLogger | None = None, progress: bool = True) -> StageResult:
    tcfg = config.train
    device = torch.device(tcfg.device)
    apply_stage(model, stage)
    processor = build_chat_processor(model, tcfg.max_length)
    samples = read_llava_json(stage.data)
    encoded, skipped = encode_all(processor, samples, tcfg.on_bad_record, name)
    if skipped:
        print(f"[vlmkit] stage {name}: skipped {len(skipped)} bad record(s), e.g. {next(iter(skipped.values()))}")
    feature_cache = None
    if "vision" not in stage.trainable and tcfg.cache_frozen_vision:
        feature_cache = cache_vision_features(model, encoded)

    per_epoch = math.ceil(len(encoded) / (stage.batch_size * stage.grad_accum))
    total_steps = stage.max_steps or max(1, math.ceil(per_epoch * stage.epochs))
    optimizer, scheduler = make_optimizer(model, stage, total_steps)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id

    last_dir = out_dir / "checkpoints" / f"{name}-last"
    step, losses = 0, []
    state = ckpt.load_trainer_state(last_dir) if last_dir.is_dir() else None
    if state is not None:
        ckpt.load_weights(model, last_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        print(f"[vlmkit] stage {name}: resuming at step {step}/{total_steps} from {last_dir}")

    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    micro_batches = _micro_batches(len(encoded), stage.batch_size, tcfg.seed, name)
    # Skip what a resumed run already consumed, so the data order matches an uninterrupted run.
    for _ in range(step * stage.grad_accum):
        next(micro_batches)
    bar = tqdm(total=total_steps, initial=step, desc=f"stage {name}", unit="step", disable=not progress)
    start = time.perf_counter()
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss, tokens = 0.0, 0
        for _ in range(stage.grad_accum):
            chunk = [encoded[i] for i in next(micro_batches)]
            batch = collate(chunk, pad_id, features=_features_for(chunk, feature_cache)).to(device)
            with autocast:
                out = model(
                    batch.input_ids, batch.attention_mask,
                    pixel_values=None if batch.image_features is not None else batch.pixel_values,
                    image_features=batch.image_features, labels=batch.labels, position_ids=batch.position_ids,
                )
            (out.loss / stage.grad_accum).backward()
            step_loss += float(out.loss.detach()) / stage.grad_accum
            tokens += out.num_supervised
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"stage {name} step {step}: non-finite gradient norm ({grad_norm})")
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.update()
        if logger and step % tcfg.log_every == 0:
            logger.log({"stage": name, "step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm), "supervised_tokens": tokens, "elapsed_s": time.perf_counter() - start})
        if tcfg.save_every and step % tcfg.save_every == 0 and step < total_steps:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "losses": losses}
            ckpt.save_checkpoint(last_dir, model, config, {"stage": name, "step": step}, trainer_state)
    bar.close()
    final_dir = ckpt.save_checkpoint(out_dir / "checkpoints" / name, model, config, {"stage": name, "step": step, "final": True})
    import shutil

    shutil.rmtree(last_dir, ignore_errors=True)
    return StageResult(name, step, time.perf_counter() - start, losses, skipped, final_dir, model.trainable_parameters())


def _micro_batches(n: int, batch_size: int, seed: int, stage: str):
    """Endless micro-batches of indices, reshuffled every epoch from a seed, so the sequence is
    reproducible and a resumed run can skip exactly what it already consumed."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + sum(map(ord, stage)))
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def run_training(config: Config, model=None, progress: bool = True) -> tuple[object, list[StageResult]]:
    """Run every stage of the recipe in order; a stage whose final checkpoint exists is loaded, not redone."""
    from vlmkit.model.vlm import VisionLanguageModel

    seed_everything(config.train.seed)
    out_dir = Path(config.train.output_dir)
    if model is None:
        model = VisionLanguageModel.build(config.model)
    model.to(config.train.device)
    logger = JsonlLogger(out_dir / "metrics.jsonl")
    results = []
    try:
        for name, stage in config.train.stages.items():
            done = out_dir / "checkpoints" / name
            if (done / ckpt.META).is_file():
                apply_stage(model, stage)
                ckpt.load_weights(model, done)
                print(f"[vlmkit] stage {name}: already trained, loaded {done}")
                results.append(StageResult(name, 0, 0.0, checkpoint=done, trainable_parameters=model.trainable_parameters()))
                continue
            results.append(train_stage(model, config, name, stage, out_dir, logger, progress))
    finally:
        logger.close()
    return model, results
