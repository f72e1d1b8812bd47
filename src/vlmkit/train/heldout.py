"""Held-out evaluation while training (`train.eval`): a fixed slice of a registered benchmark,
answered by greedy generation through the same backend `vlmkit eval run` uses, scored by the
benchmark's own rule, logged to `metrics.jsonl` as `{"event": "eval", "stage", "step", ...}`."""

from __future__ import annotations

import time

import torch

from vlmkit.config import TrainEvalConfig
from vlmkit.eval.backends import VlmkitBackend
from vlmkit.eval.benchmarks import get_benchmark


class HeldOutEval:
    def __init__(self, cfg: TrainEvalConfig, bf16: bool = False):
        self.cfg = cfg
        self.bf16 = bf16
        self.benchmark = get_benchmark(cfg.benchmark)
        items = self.benchmark.load(cfg.data)
        self.items = items[: cfg.limit] if cfg.limit else items
        # The slice is small and evaluated many times: decode its images once.
        self.requests = [self.benchmark.request(it) for it in self.items]
        self.max_new_tokens = cfg.max_new_tokens or self.benchmark.default_max_new_tokens

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.every == 0 or step == total_steps

    @torch.no_grad()
    def run(self, model) -> dict:
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        try:
            backend = VlmkitBackend(model, bf16=self.bf16)
            predictions = {}
            size = self.cfg.batch_size
            for at in range(0, len(self.items), size):
                answers = backend.generate(self.requests[at : at + size], self.max_new_tokens)
                predictions.update((it.id, a.strip()) for it, a in zip(self.items[at : at + size], answers))
        finally:
            model.train(was_training)
        result = self.benchmark.score(self.items, predictions)
        return {"event": "eval", "benchmark": self.benchmark.name, "items": len(self.items), "overall": result.overall,
                "breakdown": result.breakdown, "eval_s": time.perf_counter() - started}
