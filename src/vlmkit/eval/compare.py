"""`vlmkit eval compare RUN_A RUN_B`: is B's score different from A's, item for item?

A run is an `eval run` output folder (its `results.json` and `scores.jsonl`), or a folder of
such folders, one per benchmark. Benchmarks are paired by name; within a benchmark the two runs
must have scored the same items, or the comparison is refused (a difference would then mix
the models with the item sets). Each benchmark and each breakdown category gets a paired test
(`vlmkit.eval.stats.paired_test`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.eval.benchmarks.base import EvalInputError, read_json, read_jsonl
from vlmkit.eval.stats import COMPARE_RESAMPLES, SEED, cluster_codes, paired_test

RESULTS_NAME = "results.json"
SCORES_NAME = "scores.jsonl"


@dataclass
class RunScores:
    folder: Path
    benchmark: str
    scorer: dict[str, Any]
    scores: dict[str, float]
    clusters: dict[str, str]
    groups: dict[str, list[str]] = field(default_factory=dict)


def _read_run(folder: Path) -> RunScores:
    res = read_json(folder / RESULTS_NAME)
    if not isinstance(res, dict) or "benchmark" not in res:
        raise EvalInputError(f"{folder / RESULTS_NAME}: not an eval run's results (no 'benchmark')")
    path = folder / SCORES_NAME
    if not path.is_file():
        raise EvalInputError(f"{path}: not found; rerun `vlmkit eval run` into {folder} (it reuses the cached "
                             "answers) to write each item's score")
    run = RunScores(folder, str(res["benchmark"]), res.get("scorer") or {k: res.get(k) for k in ("metric", "parser")}, {}, {})
    for lineno, rec in read_jsonl(path):
        try:
            key = str(rec["id"])
            run.scores[key] = float(rec["score"])
            run.clusters[key] = str(rec.get("cluster", key))
            for g in rec.get("groups", []):
                run.groups.setdefault(str(g), []).append(key)
        except (KeyError, TypeError, ValueError):
            raise EvalInputError(f"{path}:{lineno}: expected {{\"id\", \"score\", \"cluster\", \"groups\"}}") from None
    return run


def load_runs(path: str | Path) -> dict[str, RunScores]:
    """The runs in `path` by benchmark name: the folder itself, or each sub-folder holding a run."""
    folder = Path(path)
    if folder.is_file() and folder.name == RESULTS_NAME:
        folder = folder.parent
    if not folder.is_dir():
        raise EvalInputError(f"{folder}: run folder not found")
    if (folder / RESULTS_NAME).is_file():
        run = _read_run(folder)
        return {run.benchmark: run}
    runs: dict[str, RunScores] = {}
    for sub in sorted(p for p in folder.iterdir() if (p / RESULTS_NAME).is_file()):
        run = _read_run(sub)
        if run.benchmark in runs:
            raise EvalInputError(f"{folder}: two runs of {run.benchmark} ({runs[run.benchmark].folder.name}, {sub.name})")
        runs[run.benchmark] = run
    if not runs:
        raise EvalInputError(f"{folder}: no {RESULTS_NAME} in it or in its sub-folders")
    return runs


def _same_items(name: str, a: RunScores, b: RunScores) -> list[str]:
    only_a = sorted(set(a.scores) - set(b.scores))
    only_b = sorted(set(b.scores) - set(a.scores))
    if only_a or only_b:
        parts = [f"{len(x)} only in {r.folder} (e.g. {x[0]!r})" for x, r in ((only_a, a), (only_b, b)) if x]
        raise EvalInputError(f"{name}: the runs scored different item sets ({'; '.join(parts)}); "
                             "a paired comparison needs the same items in both")
    return list(a.scores)


def compare_runs(path_a: str | Path, path_b: str | Path, *, n_resamples: int = COMPARE_RESAMPLES,
                 seed: int = SEED) -> dict[str, Any]:
    """Paired tests of B against A for every benchmark both hold, overall and per category."""
    runs_a, runs_b = load_runs(path_a), load_runs(path_b)
    common = [n for n in runs_a if n in runs_b]
    if not common:
        raise EvalInputError(f"no benchmark in both runs ({', '.join(runs_a)} vs {', '.join(runs_b)})")
    out: dict[str, Any] = {"a": str(path_a), "b": str(path_b), "benchmarks": {},
                           "only_in_one": sorted(set(runs_a) ^ set(runs_b)),
                           "test": {"p_value": "paired bootstrap over clusters, two-sided", "resamples": n_resamples,
                                    "seed": seed}}
    for name in common:
        a, b = runs_a[name], runs_b[name]
        ids = _same_items(name, a, b)
        entry: dict[str, Any] = {"scorer_differs": a.scorer != b.scorer}
        pos = {i: k for k, i in enumerate(ids)}
        keys = [a.clusters[i] for i in ids]
        va, vb = [a.scores[i] for i in ids], [b.scores[i] for i in ids]
        entry["overall"] = paired_test(va, vb, cluster_codes(keys), n_resamples=n_resamples, seed=seed).to_json()
        entry["categories"] = {}
        for cat, members in sorted(a.groups.items()):
            idx = [pos[i] for i in members]
            entry["categories"][cat] = paired_test([va[k] for k in idx], [vb[k] for k in idx],
                                                   cluster_codes([keys[k] for k in idx]),
                                                   n_resamples=n_resamples, seed=seed).to_json()
        out["benchmarks"][name] = entry
    return out


def format_comparison(report: dict[str, Any]) -> str:
    lines = [f"B = {report['b']}  vs  A = {report['a']}   (diff = B - A; 95% CI; p: {report['test']['p_value']})"]
    for name, entry in report["benchmarks"].items():
        rows = [(name, entry["overall"])] + [(f"  {k}", v) for k, v in entry["categories"].items()]
        width = max(len(r[0]) for r in rows)
        if entry["scorer_differs"]:
            lines.append(f"warning: {name}: the two runs were scored by different rules (see their results.json)")
        for label, t in rows:
            mark = " *" if t["p_value"] < 0.05 else ""
            lines.append(f"{label:<{width}}  A {t['mean_a']:.4f}  B {t['mean_b']:.4f}  diff {t['diff']:+.4f} "
                         f"[{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]  p {t['p_value']:.4f}{mark}  (n {t['n_items']})")
    if report["only_in_one"]:
        lines.append(f"not compared (in one run only): {', '.join(report['only_in_one'])}")
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
