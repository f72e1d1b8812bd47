"""`eval score` speed on 10,000 predictions per benchmark: the official rule and the error bars.

    python benchmarks/eval_score_speed.py                      # the benchmarks with an official release layout
    python benchmarks/eval_score_speed.py --n 10000 mmstar

A small synthetic copy (`vlmkit data synth-bench`) is loaded once and its items repeated under new
ids up to N (MMBench keeps its circular groups); the answers mix the gold letter, verbose and
bracketed forms, option texts and unreadable text, so every branch of the rule runs. Prints one
JSON line per benchmark: seconds for `score`, for the error bars (1,000 clustered resamples),
and per 1,000 items.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmkit.eval.benchmarks import get_benchmark
from vlmkit.eval.stats import add_error_bars
from vlmkit.eval.synth import synth_bench

BASE = 100  # questions in the synthetic copy that is repeated


def _repeat(name: str, items: list, n: int) -> list:
    out, rep = [], 0
    while len(out) < n:
        for it in items:
            new_id = str(int(it.id) + rep * BASE) if name == "mmbench" else f"{it.id}#{rep}"
            out.append(dataclasses.replace(it, id=new_id))
        rep += 1
    if name == "mmbench":  # keep whole circular groups
        keep = {int(i.id) % 1_000_000 for i in out[:n]}
        return [i for i in out if int(i.id) % 1_000_000 in keep]
    return out[:n]


def _answers(items: list, rng: random.Random) -> dict[str, str]:
    preds = {}
    for it in items:
        gold = it.answers[0]
        options = it.metadata.get("options") or {}
        text = next(iter(options.values())) if isinstance(options, dict) and options else "the first one"
        preds[it.id] = rng.choice([gold, f"The answer is {gold}", f"({gold}) because", f"Answer: {gold}",
                                   text, "I am not sure what this shows.", ""])
    return preds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("benchmarks", nargs="*", default=["pope", "mme", "hallusionbench", "ai2d", "mmbench", "mmstar",
                                                     "mmmu-pro-standard", "mmmu-pro-vision"])
    ap.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.benchmarks:
            synth_bench(name, Path(tmp) / name, n=BASE, write_gold=False)
            bench = get_benchmark(name)
            items = _repeat(name, bench.load(Path(tmp) / name), args.n)
            preds = _answers(items, rng)
            t0 = time.perf_counter()
            result = bench.score(items, preds)
            t1 = time.perf_counter()
            add_error_bars(bench, result)
            t2 = time.perf_counter()
            print(json.dumps({"benchmark": name, "predictions": len(items), "score_s": round(t1 - t0, 3),
                              "error_bars_s": round(t2 - t1, 3),
                              "s_per_1000": round((t2 - t0) / len(items) * 1000, 4), "overall": round(result.overall, 4)}))


if __name__ == "__main__":
    main()
