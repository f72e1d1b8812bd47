"""Benchmarks: each module registers its benchmark in `vlmkit.registry.BENCHMARKS`."""

from __future__ import annotations

from vlmkit.registry import BENCHMARKS

from . import chair, chartqa, docvqa, mathvista, mmmu, ocrbench, synth_media, synth_qa, vqa  # noqa: F401  (registration)
from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, read_predictions


def get_benchmark(name: str, **kwargs) -> Benchmark:
    try:
        return BENCHMARKS.build(name.lower(), **kwargs)
    except KeyError as e:
        raise EvalInputError(str(e.args[0])) from None


__all__ = ["BenchItem", "Benchmark", "EvalInputError", "ScoreResult", "get_benchmark", "read_predictions"]
