"""Benchmarks: each module registers its benchmark in `vlmkit.registry.BENCHMARKS`; the
registries' discovery (`vlmkit.registry.load_plugins`) imports every module here, so a new
benchmark is one new file.

A benchmark is named by a spec: `NAME`, `NAME:DATA` (the data file or folder given with the
name, as in `custom:my-test.json`) and either followed by `?key=value&...` options for the
benchmark's builder (`custom:my-test.json?metric=anls`)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, read_predictions

_OPTIONS = re.compile(r"\?([A-Za-z_]+=[^?&=]*(?:&[A-Za-z_]+=[^?&=]*)*)$")


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """(name, data or None, options) of a benchmark spec (see the module docstring)."""
    options: dict[str, str] = {}
    found = _OPTIONS.search(spec)
    if found:
        options = dict(parse_qsl(found.group(1), keep_blank_values=True))
        spec = spec[: found.start()]
    name, sep, data = spec.partition(":")
    return name.lower(), (data if sep else None), options


def get_benchmark(spec: str, **kwargs) -> Benchmark:
    """The benchmark a spec names, built with its `?key=value` options and `kwargs`."""
    name, _, options = parse_spec(spec)
    try:
        builder = BENCHMARKS.get(name)
    except KeyError as e:
        raise EvalInputError(f"{e.args[0]}; or custom:FILE for your own held-out file") from None
    try:
        return builder(**options, **kwargs)
    except TypeError:
        if not options:
            raise
        raise EvalInputError(f"benchmark {name!r} takes no option {', '.join(map(repr, options))}") from None


def benchmark_data(spec: str, data: str | None) -> str:
    """The data a run reads: the file or folder named in the spec, or `data` (--data); one of
    the two, not both."""
    name, in_spec, _ = parse_spec(spec)
    if in_spec and data:
        raise EvalInputError(f"the data is given twice: in {spec!r} and as --data {data}; give it once")
    if not in_spec and not data:
        hint = f" (or {name}:FILE)" if name == "custom" else ""
        raise EvalInputError(f"{name}: no data given; pass --data{hint}")
    return in_spec or str(data)


__all__ = ["BenchItem", "Benchmark", "EvalInputError", "ScoreResult", "benchmark_data", "get_benchmark", "parse_spec",
           "read_predictions"]
