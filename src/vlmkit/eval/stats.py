"""Error bars: bootstrap confidence intervals over items and paired comparisons of two runs.

Items that share a cluster (MMBench's circular passes of one question, MME's two questions about
one image, ...; `Benchmark.cluster_key`) are resampled together: the unit the benchmark drew is
the cluster, so resampling its items one by one would make the interval too narrow. A score is a
mean over items, so a resampled score is (sum of the drawn clusters' item scores) / (number of
their items). Intervals are percentile intervals. docs/evaluation.md says why a bootstrap and not
only lmms-eval's normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_RESAMPLES = 1000  # per score in results.json: enough for a percentile interval to ~0.5 points
COMPARE_RESAMPLES = 10000  # a p-value near 0.01 needs more draws than an interval does
SEED = 0
_CHUNK_CELLS = 2_000_000  # resample draws held in memory at once


def cluster_codes(keys: Sequence[str]) -> np.ndarray:
    """Integer codes 0..G-1 for cluster names, in order of first appearance."""
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))


def _cluster_sums(values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_clusters = int(codes.max()) + 1 if len(codes) else 0
    return (np.bincount(codes, weights=values, minlength=n_clusters),
            np.bincount(codes, minlength=n_clusters).astype(np.float64))


def bootstrap_means(values: Sequence[float], codes: np.ndarray | None = None, *, n_resamples: int = N_RESAMPLES,
                    seed: int = SEED) -> np.ndarray:
    """`n_resamples` means of `values`, each over clusters drawn with replacement (items alone
    when `codes` is None)."""
    vals = np.asarray(values, dtype=np.float64)
    codes = np.arange(len(vals)) if codes is None else np.asarray(codes)
    sums, counts = _cluster_sums(vals, codes)
    n_clusters = len(sums)
    if n_clusters == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    step = max(1, _CHUNK_CELLS // n_clusters)
    for at in range(0, n_resamples, step):
        draw = rng.integers(0, n_clusters, size=(min(step, n_resamples - at), n_clusters))
        out[at : at + len(draw)] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return out


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    if len(draws) == 0:
        return (0.0, 0.0)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def bootstrap_ci(values: Sequence[float], codes: np.ndarray | None = None, *, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (clustered by `codes`)."""
    return percentile_interval(bootstrap_means(values, codes, n_resamples=n_resamples, seed=seed), level)


# ---------------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class PairedTest:
    n_items: int
    n_clusters: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    ci: tuple[float, float]
    p_value: float  # paired bootstrap, two-sided
    p_paired_t: float  # normal approximation with the clustered standard error (lmms-eval's test)
    p_mcnemar: float | None  # exact McNemar, for 0/1 scores without clusters
    b_better: int  # items B gets right and A wrong (0/1 scores)
    a_better: int

    def to_json(self) -> dict:
        return {"n_items": self.n_items, "n_clusters": self.n_clusters, "mean_a": self.mean_a, "mean_b": self.mean_b,
                "diff": self.diff, "ci": list(self.ci), "p_value": self.p_value, "p_paired_t": self.p_paired_t,
                "p_mcnemar": self.p_mcnemar, "b_better": self.b_better, "a_better": self.a_better}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of b against b + c at one half."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2 * tail)


def clustered_se(values: np.ndarray, codes: np.ndarray) -> float:
    """Cluster-robust standard error of a mean (Miller 2024, eq. 4; the plain CLT error without clusters)."""
    n = len(values)
    sums, _counts = _cluster_sums(values - values.mean(), codes)
    g = len(sums)
    if n == 0 or g < 2:
        return 0.0
    return math.sqrt(g / (g - 1) * float((sums**2).sum())) / n


def paired_test(a: Sequence[float], b: Sequence[float], codes: np.ndarray | None = None, *,
                n_resamples: int = COMPARE_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> PairedTest:
    """B against A on the same items: the mean difference, its clustered bootstrap interval and a
    two-sided p-value from the same draws, recentred on the null of no difference."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    codes = np.arange(len(va)) if codes is None else np.asarray(codes)
    d = vb - va
    diff = float(d.mean()) if len(d) else 0.0
    draws = bootstrap_means(d, codes, n_resamples=n_resamples, seed=seed)
    extreme = int(np.count_nonzero(np.abs(draws - diff) >= abs(diff) - 1e-12)) if diff else len(draws)
    p = min(1.0, (extreme + 1) / (len(draws) + 1))
    se = clustered_se(d, codes)
    p_t = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else (1.0 if diff == 0 else 0.0)
    binary = bool(np.isin(va, (0.0, 1.0)).all() and np.isin(vb, (0.0, 1.0)).all())
    b_better = int(((vb == 1) & (va == 0)).sum()) if binary else 0
    a_better = int(((va == 1) & (vb == 0)).sum()) if binary else 0
    n_clusters = int(codes.max()) + 1 if len(codes) else 0
    mcn = mcnemar_exact(b_better, a_better) if binary and n_clusters == len(va) else None
    return PairedTest(len(va), n_clusters, float(va.mean()) if len(va) else 0.0, float(vb.mean()) if len(vb) else 0.0,
                      diff, percentile_interval(draws, level), p, p_t, mcn, b_better, a_better)


# ---------------------------------------------------------------------------------------------
# Error bars for a scored result
# ---------------------------------------------------------------------------------------------


def _is_mean(values: list[float], figure: float) -> bool:
    return bool(values) and abs(sum(values) / len(values) - figure) < 1e-9


def add_error_bars(benchmark, result, *, n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL):
    """Fill `result.ci` (overall and each breakdown entry that is a mean over the items in
    `result.groups`), `result.error_bars` and `result.scorer`; returns `result`.

    A figure that is not a mean over items (CHAIR's CHAIRi, a sum of subtask scores) gets no
    interval, and `error_bars["without_ci"]` names it."""
    result.scorer = benchmark.rule()
    ids = list(result.per_item)
    keys = [benchmark.cluster_key(i) for i in ids]
    codes = cluster_codes(keys)
    position = {i: k for k, i in enumerate(ids)}
    values = np.fromiter((result.per_item[i] for i in ids), dtype=np.float64, count=len(ids))
    ci: dict[str, list[float]] = {}
    without: list[str] = []
    if ids and _is_mean(values.tolist(), result.overall):
        ci["overall"] = list(bootstrap_ci(values, codes, n_resamples=n_resamples, seed=seed, level=level))
    else:
        without.append("overall")
    for name, figure in result.breakdown.items():
        members = [position[i] for i in result.groups.get(name, ()) if i in position]
        sub = values[members]
        if members and _is_mean(sub.tolist(), figure):
            ci[name] = list(bootstrap_ci(sub, cluster_codes([keys[m] for m in members]), n_resamples=n_resamples,
                                         seed=seed, level=level))
        else:
            without.append(name)
    result.ci = ci
    result.error_bars = {"method": "percentile bootstrap over items, resampling whole clusters (Benchmark.cluster_key)",
                         "level": level, "resamples": n_resamples, "seed": seed, "items": len(ids),
                         "clusters": int(codes.max()) + 1 if len(codes) else 0, "without_ci": without}
    return result
