"""Subcommands: `vlmkit eval score|run|compare|contamination|prepare|list` and `vlmkit data synth-bench`."""

from __future__ import annotations

import os

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from vlmkit.eval.synth import GOLD_NAME

eval_app = typer.Typer(help="Evaluate models on benchmarks with their official scoring.", no_args_is_help=True, rich_markup_mode=None)
data_app = typer.Typer(help="Data utilities.", no_args_is_help=True, rich_markup_mode=None)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


BENCHMARK_HELP = "{benchmarks} (`vlmkit eval list`); custom:FILE[?metric=exact|contains|relaxed|anls] scores your own held-out file"
DATA_HELP = "folder with the benchmark's official files (`vlmkit data synth-bench` writes a small one); not with custom:FILE"


class _RegistryHelp(TyperCommand):
    """Fills `{benchmarks}` in an option's help with the registered benchmarks when the help is
    shown, so `--help` lists exactly what `eval list` lists (discovery imports every model
    family, too slow to do on every start)."""

    def format_help(self, ctx, formatter) -> None:
        from vlmkit.registry import BENCHMARKS

        for param in self.params:
            if getattr(param, "help", None) and "{benchmarks}" in param.help:
                param.help = param.help.replace("{benchmarks}", ", ".join(BENCHMARKS.names()))
        super().format_help(ctx, formatter)


def _benchmark(name: str, judge: Optional[str] = None, judge_base_url: Optional[str] = None):
    from vlmkit.eval.benchmarks import get_benchmark, parse_spec

    if judge and parse_spec(name)[0] == "mathvista":
        from vlmkit.eval.benchmarks.mathvista import llm_judge_extractor

        return get_benchmark(name, extractor=llm_judge_extractor(judge, judge_base_url),
                             extractor_name=f"mathvista-llm-judge ({judge})")
    if judge:
        _fail("--judge applies to mathvista only")
    return get_benchmark(name)


def _print_result(result, as_json: bool, per_item: bool = False, extra_fields: Optional[dict] = None) -> None:
    if as_json:
        typer.echo(json.dumps({**result.to_json(per_item=per_item), **(extra_fields or {})}, indent=2, ensure_ascii=False))
        return
    def ci(key: str) -> str:
        return f"  [{result.ci[key][0]:.4f}, {result.ci[key][1]:.4f}]" if key in result.ci else ""

    typer.echo(f"{result.benchmark}: {result.display}   (overall {result.overall:.4f}{ci('overall')}; "
               f"{result.n_predicted}/{result.n_items} items predicted)")
    typer.echo(f"  metric: {result.metric}")
    typer.echo(f"  parser: {result.parser}")
    if result.scorer:
        typer.echo(f"  scorer: {result.scorer['scorer']} ({result.scorer['version']}); source: {result.scorer['source']}")
    width = max((len(k) for k in result.breakdown), default=0)
    for k, v in result.breakdown.items():
        typer.echo(f"  {k:<{width}}  {v:.4f}{ci(k)}")
    for k, v in result.extra.items():
        if isinstance(v, (int, float, str, bool)):
            typer.echo(f"  {k}: {v}")
        elif k.endswith("_range") and isinstance(v, list) and len(v) == 2:
            typer.echo(f"  {k}: [{v[0]:.4f}, {v[1]:.4f}]")
        elif k == "category_points":
            for cat, pts in v.items():
                typer.echo(f"  points {cat}: {pts}")
    if result.n_missing:
        typer.echo(f"  warning: {result.n_missing} item(s) have no prediction and count as wrong", err=True)


@eval_app.command("score", cls=_RegistryHelp)
def score_cmd(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=BENCHMARK_HELP),
    data: Path | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    predictions: Path = typer.Option(..., "--predictions", "-p", help='JSONL, one {"id": ..., "prediction": ...} a line'),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    per_item: bool = typer.Option(False, "--per-item", help="with --json: include each item's score"),
    judge: Optional[str] = typer.Option(None, help="MathVista: model name of an OpenAI-compatible LLM answer extractor"),
    judge_base_url: Optional[str] = typer.Option(None, help="MathVista: base URL of the judge endpoint"),
) -> None:
    """Score a predictions file with the benchmark's official metric."""
    from vlmkit.eval.benchmarks import EvalInputError, benchmark_data, read_predictions
    from vlmkit.eval.stats import add_error_bars

    try:
        bench = _benchmark(benchmark, judge, judge_base_url)
        items = bench.load(benchmark_data(benchmark, data))
        preds = read_predictions(predictions)
        result = add_error_bars(bench, bench.score(items, preds))
    except EvalInputError as e:
        _fail(str(e))
    _print_result(result, as_json, per_item)


@eval_app.command("run", cls=_RegistryHelp)
def run_cmd(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=BENCHMARK_HELP),
    data: Path | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    model: str = typer.Option(..., "--model", "-m", help="hf:/path/folder | openai:MODEL | vlmkit:/path/checkpoint"),
    out: Path = typer.Option(Path("eval-out"), "--out", "-o", help="output folder (prediction cache, results)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="questions answered together"),
    max_new_tokens: Optional[int] = typer.Option(None, help="default: the benchmark's own"),
    limit: Optional[int] = typer.Option(None, help="only the first N items"),
    base_url: Optional[str] = typer.Option(None, help="openai: endpoint base URL (default $OPENAI_BASE_URL)"),
    api_key: Optional[str] = typer.Option(None, help="openai: API key (default $OPENAI_API_KEY)"),
    device: Optional[str] = typer.Option(None, help="hf/vlmkit: torch device"),
    compile_decode: bool = typer.Option(False, help="vlmkit: compile the decode step (CUDA graphs on a GPU); pays off over many batches"),
    judge: Optional[str] = typer.Option(None, help="MathVista: LLM answer extractor model"),
    judge_base_url: Optional[str] = typer.Option(None, help="MathVista: base URL of the judge endpoint"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Generate answers (batched, resumable) and score them."""
    from vlmkit.eval.backends import make_backend
    from vlmkit.eval.benchmarks import EvalInputError, benchmark_data
    from vlmkit.eval.runner import run_benchmark

    try:
        bench = _benchmark(benchmark, judge, judge_base_url)
        data = Path(benchmark_data(benchmark, data))
        items = bench.load(data)
        if limit is not None:
            items = items[:limit]
        if device and device.startswith("cuda") and ":" not in device and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # torchrun: one GPU per rank
        backend = make_backend(model, base_url=base_url, api_key=api_key, device=device, compile_decode=compile_decode)
        outcome = run_benchmark(bench, items, backend, out, model_spec=model, data_dir=str(data),
                                batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    except EvalInputError as e:
        _fail(str(e))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    _print_result(outcome.result, as_json, extra_fields={"out": str(outcome.out_dir), "generated": outcome.generated,
                                                         "reused_from_cache": outcome.reused,
                                                         "samples_per_s": outcome.samples_per_s})
    if not as_json:
        typer.echo(f"  results: {outcome.out_dir / 'results.json'}, {outcome.out_dir / 'results.md'} "
                   f"({outcome.generated} generated, {outcome.reused} from cache)")


@eval_app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="an `eval run` output folder (or a folder of them, one per benchmark)"),
    run_b: Path = typer.Argument(..., help="the run compared with RUN_A, on the same items"),
    resamples: int = typer.Option(10000, "--resamples", min=100, help="bootstrap resamples"),
    seed: int = typer.Option(0, help="seed of the bootstrap draws"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Paired test of RUN_B against RUN_A, per benchmark and per category: the difference in score,
    its 95% CI and a p-value (paired bootstrap over items, clustered as the benchmark groups them)."""
    from vlmkit.eval.benchmarks import EvalInputError
    from vlmkit.eval.compare import compare_runs, dumps, format_comparison

    try:
        report = compare_runs(run_a, run_b, n_resamples=resamples, seed=seed)
    except EvalInputError as e:
        _fail(str(e))
    typer.echo(dumps(report) if as_json else format_comparison(report))


@eval_app.command("contamination", cls=_RegistryHelp)
def contamination_cmd(
    train: Path = typer.Option(..., "--train", help="LLaVA-format training JSON"),
    benchmark: str = typer.Option(..., "--benchmark", "-b", help=BENCHMARK_HELP),
    data: Path | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    n: int = typer.Option(8, "--n", min=1, help="n-gram length in words"),
    threshold: float = typer.Option(0.5, help="an item counts as contaminated when this share of its n-grams is in the training set"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """N-gram overlap between a training set's texts and a benchmark's questions and answers."""
    from vlmkit.eval.benchmarks import EvalInputError, benchmark_data
    from vlmkit.eval.contamination import contamination_report

    try:
        items = _benchmark(benchmark).load(benchmark_data(benchmark, data))
        report = contamination_report(train, items, n=n, threshold=threshold, benchmark=benchmark)
    except EvalInputError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"{benchmark}: {report.n_contaminated}/{report.n_items} items ({100 * report.contaminated_fraction:.2f}%) "
               f"have >= {threshold:.0%} of their {n}-grams in {train}")
    typer.echo(f"  benchmark {n}-grams found in training texts: {100 * report.ngram_overlap:.2f}% "
               f"({report.n_train_texts} training texts)")
    for ex in report.examples[:10]:
        typer.echo(f"  {ex['id']}: {100 * ex['overlap']:.0f}%  {ex['text'][:90]!r}")


@eval_app.command("prepare")
def prepare_cmd(
    benchmark: str = typer.Argument(..., help="chartqa, docvqa, hallusionbench, mathvista, mmbench, mme, mmmu, ocrbench, pope, textvqa or vqav2"),
    source: Path = typer.Argument(..., help="the Hugging Face copy lmms-eval reads: a folder of parquet shards (or one shard)"),
    target: Path = typer.Argument(..., help="folder to write the official layout into (new, empty, or an earlier prepare output)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Turn a benchmark's Hugging Face parquet copy (as lmms-eval uses) into the official layout
    `eval run` and `eval score` read (docs/evaluation.md lists the dataset ids)."""
    from vlmkit.eval.benchmarks import EvalInputError
    from vlmkit.eval.prepare import prepare_benchmark

    try:
        info = prepare_benchmark(benchmark, source, target, progress=progress)
    except EvalInputError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{info['benchmark']}: {info['items']} items from {len(info['shards'])} shard(s) of {info['dataset']} "
               f"({info['split']}) -> {info['dir']}")
    for split in info.get("missing_splits", []):
        typer.echo(f"note: the copy has no shard of split {split!r}; its items are not in the output")


@eval_app.command("list")
def list_cmd() -> None:
    """Benchmarks and model backends known to this build."""
    from vlmkit.eval.backends import BACKENDS
    from vlmkit.registry import BENCHMARKS

    import vlmkit.eval.benchmarks  # noqa: F401  (registration)

    for name in BENCHMARKS.names():
        b = BENCHMARKS.build(name)
        typer.echo(f"{name:10s} {b.metric}")
    typer.echo("model kinds: " + ", ".join(f"{k}:..." for k in sorted(BACKENDS)))


@data_app.command("synth-bench")
def synth_bench_cmd(
    name: str = typer.Argument(..., help="benchmark name, or 'all'"),
    out_dir: Path = typer.Argument(..., help="folder to write the benchmark's official layout into"),
    n: int = typer.Option(12, "--n", min=1, help="items per split"),
    seed: int = typer.Option(0, help="seed for the synthetic items"),
    predictions: bool = typer.Option(True, "--predictions/--no-predictions",
                                     help=f"also write {GOLD_NAME} (the gold answers as a predictions file)"),
) -> None:
    """Write a small synthetic benchmark in its official layout, images included."""
    from vlmkit.eval.benchmarks import EvalInputError
    from vlmkit.eval.synth import SYNTHESIZERS, synth_bench

    names = sorted(SYNTHESIZERS) if name == "all" else [name.lower()]
    try:
        for nm in names:
            target = out_dir / nm if name == "all" else out_dir
            info = synth_bench(nm, target, n=n, seed=seed, write_gold=predictions)
            typer.echo(f"{nm}: {info['items']} items, {info['images']} images -> {target}")
    except EvalInputError as e:
        _fail(str(e))


@data_app.command("synth-train")
def synth_train_cmd(
    out_dir: Path = typer.Argument(..., help="folder to write train.json, test.json, video.json, video_test.json and their media into"),
    n: int = typer.Option(320, "--n", min=1, help="training samples with images (a quarter of them with two images)"),
    n_test: int = typer.Option(48, "--n-test", min=1, help="held-out questions"),
    n_video: int = typer.Option(96, "--n-video", min=0, help="training videos (0: none)"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Write the small built-in training set every family recipe (recipes/families/) trains on:
    images of many sizes and aspect ratios, two-image samples and short videos."""
    from vlmkit.data.synthetic.families import write_family_dataset

    paths = write_family_dataset(out_dir, n_train=n, n_test=n_test, n_video=n_video, seed=seed)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def _group(app: typer.Typer, name: str, sub: typer.Typer) -> None:
    """Attach `sub` as `name`, or merge its commands into a group of that name another module made."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            info.typer_instance.registered_commands.extend(sub.registered_commands)
            return
    app.add_typer(sub, name=name)


def register(app: typer.Typer) -> None:
    _group(app, "eval", eval_app)
    _group(app, "data", data_app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_app())
