"""Benchmarks: each module registers its benchmark in `vlmkit.registry.BENCHMARKS`; the
registries' discovery (`vlmkit.registry.load_plugins`) imports every module here, so a new
benchmark is one new file."""

from __future__ import annotations

from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, read_predictions


def get_benchmark(name: str, **kwargs) -> Benchmark:
    try:
        return BENCHMARKS.build(name.lower(), **kwargs)
    except KeyError as e:
        raise EvalInputError(str(e.args[0])) from None


__all__ = ["BenchItem", "Benchmark", "EvalInputError", "ScoreResult", "get_benchmark", "read_predictions"]
