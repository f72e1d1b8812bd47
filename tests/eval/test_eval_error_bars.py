"""Error bars: the bootstrap interval covers the truth at its nominal rate, clusters widen it as
they should, and `eval compare` finds a planted difference and none between runs of one model."""

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from vlmkit.commands import evaluate
from vlmkit.eval.benchmarks import get_benchmark
from vlmkit.eval.runner import run_benchmark
from vlmkit.eval.stats import bootstrap_ci, cluster_codes, clustered_se, mcnemar_exact, paired_test
from vlmkit.eval.synth import synth_bench


def _coverage(rng, runs, draw, truth, codes=None, n_resamples=400):
    hits = 0
    for k in range(runs):
        lo, hi = bootstrap_ci(draw(rng), codes, n_resamples=n_resamples, seed=k)
        hits += lo <= truth <= hi
    return hits / runs


def test_bootstrap_ci_covers_the_true_accuracy_at_95_percent():
    rng = np.random.default_rng(1)
    cover = _coverage(rng, 1000, lambda r: (r.random(300) < 0.7).astype(float), 0.7)
    assert 0.93 <= cover <= 0.97, cover


def test_clustered_ci_covers_and_an_unclustered_one_does_not():
    """150 clusters of 4 items that share their difficulty (as MMBench's rotations share a question)."""
    rng = np.random.default_rng(2)
    codes = np.repeat(np.arange(150), 4)

    def draw(r):
        p = np.repeat(r.beta(1.4, 0.6, size=150), 4)  # mean accuracy 0.7
        return (r.random(600) < p).astype(float)

    assert 0.93 <= _coverage(rng, 1000, draw, 0.7, codes) <= 0.97
    assert _coverage(rng, 300, draw, 0.7) < 0.85  # items resampled alone: far too narrow


def test_mcnemar_and_clustered_se_by_hand():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    x = np.array([1.0, 0.0, 1.0, 1.0])
    # No clusters: the CLT standard error sqrt(sum (x - mean)^2 / (n (n - 1))) (Miller 2024, eq. 1).
    assert clustered_se(x, np.arange(4)) == pytest.approx(np.sqrt(((x - 0.75) ** 2).sum() / 12))
    assert list(cluster_codes(["b", "a", "b", "c"])) == [0, 1, 0, 2]


def test_paired_test_finds_a_planted_five_points_and_nothing_between_identical_runs():
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[:25]] = 0.0  # 25 of 500 answers turned wrong: 5 points
    t = paired_test(a, b)
    assert t.diff == pytest.approx(-0.05) and t.ci[1] < 0 and t.p_value < 0.001
    assert t.a_better == 25 and t.b_better == 0 and t.p_mcnemar < 1e-6 and t.p_paired_t < 1e-5
    same = paired_test(a, a.copy())
    assert same.diff == 0.0 and same.p_value == 1.0 and same.ci == (0.0, 0.0)


def test_paired_test_rejects_at_its_level_between_runs_of_one_model():
    """Two sampled runs of one model (each item right with its own probability, independently per
    run) differ by chance only: the test rejects about 5% of such pairs."""
    rng = np.random.default_rng(4)
    rejected = 0
    for k in range(200):
        p = rng.beta(2, 1, size=500)
        a, b = (rng.random(500) < p).astype(float), (rng.random(500) < p).astype(float)
        rejected += paired_test(a, b, n_resamples=1000, seed=k).p_value < 0.05
    assert rejected / 200 <= 0.09


class PromptBackend:
    name = "by-prompt"

    def __init__(self, table):
        self.table = table

    def generate(self, batch, max_new_tokens):
        return [self.table[p] for p, _ in batch]


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    evaluate.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_eval_compare_cli(tmp_path, cli):
    d = tmp_path / "mmstar"
    synth_bench("mmstar", d, n=60)
    b = get_benchmark("mmstar")
    items = b.load(d)
    right = {b.prompt(it): it.answers[0] for it in items}
    worse = dict(right)
    for it in items[:20]:
        worse[b.prompt(it)] = "no idea"
    for name, table, limit in (("a", right, None), ("b", worse, None), ("short", right, 50)):
        run_benchmark(b, items[:limit], PromptBackend(table), tmp_path / "runs" / name / "mmstar", model_spec=name,
                      data_dir=str(d), progress=False)
    res = cli("eval", "compare", tmp_path / "runs" / "a", tmp_path / "runs" / "b" / "mmstar", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)["benchmarks"]["mmstar"]
    assert rep["overall"]["diff"] == pytest.approx(-20 / 60) and rep["overall"]["p_value"] < 0.01
    assert rep["overall"]["n_items"] == 60 and not rep["scorer_differs"]
    assert set(rep["categories"]) == set(b.score(items, {}).breakdown)
    text = cli("eval", "compare", tmp_path / "runs" / "a", tmp_path / "runs" / "a")
    assert text.exit_code == 0 and "diff +0.0000" in text.output and "p 1.0000" in text.output
    res = cli("eval", "compare", tmp_path / "runs" / "a", tmp_path / "runs" / "short")
    assert res.exit_code == 2 and "different item sets" in res.output and "10 only in" in res.output


def test_eval_compare_refuses_what_it_cannot_pair(tmp_path, cli):
    d = tmp_path / "mmstar"
    synth_bench("mmstar", d, n=6)
    b = get_benchmark("mmstar")
    items = b.load(d)
    run_benchmark(b, items, PromptBackend({b.prompt(it): "A" for it in items}), tmp_path / "a", model_spec="a",
                  data_dir=str(d), progress=False)
    (tmp_path / "empty").mkdir()
    res = cli("eval", "compare", tmp_path / "a", tmp_path / "empty")
    assert res.exit_code == 2 and "no results.json" in res.output
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text((tmp_path / "a" / "results.json").read_text())
    res = cli("eval", "compare", tmp_path / "a", tmp_path / "old")
    assert res.exit_code == 2 and "scores.jsonl: not found" in res.output
    (tmp_path / "old" / "scores.jsonl").write_text('{"id": "0"}\n')
    res = cli("eval", "compare", tmp_path / "a", tmp_path / "old")
    assert res.exit_code == 2 and "scores.jsonl:1:" in res.output
