"""A stage's freeze and learning-rate spec, applied to a model. The spec is data (StageConfig)."""

from __future__ import annotations

import math

import torch

from vlmkit.config import StageConfig
from vlmkit.model import lora


def apply_stage(model, stage: StageConfig) -> None:
    """Freeze per the stage; a LoRA stage adds its adapters (kept if the model already has the
    same ones, e.g. from the previous stage); a stage without LoRA merges any adapters first.
    QLoRA is checked where it quantizes, against the device the part's weights are on."""
    spec = stage.lora.model_dump() if stage.lora is not None else None
    if lora.has_adapters(model) and model.lora_spec != spec:
        lora.merge_adapters(model)
    model.set_trainable(stage.trainable)
    if spec is not None:
        lora.add_adapters(model, spec)


def param_groups(model, stage: StageConfig) -> list[dict]:
    """One AdamW group per trainable part (its own LR); biases and norms get no weight decay."""
    groups = []
    for name, module in model.parts().items():
        if name not in stage.trainable:
            continue
        lr = stage.part_lr.get(name, stage.lr)
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in pname.lower() else decay).append(p)
        for params, wd in ((decay, stage.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "part": name})
    if not groups:
        raise ValueError(f"stage trains {stage.trainable} but those parts have no parameters")
    return groups


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model, stage: StageConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, stage.warmup_ratio))
    return opt, sched
