"""`vlmkit eval run`: batched generation into a resumable prediction cache, then official scoring.

The cache (`predictions.jsonl` in the output folder) is itself a valid predictions file for
`vlmkit eval score`. Each batch is appended with one write and an fsync, so a run killed at
any point keeps every answered item; rerunning skips them and ends with the same score.

Each cached prediction carries a fingerprint of what was asked (the prompt and the bytes of
its images), so a cache is reused only for the same data: another dataset whose ids overlap
is refused, not scored with the first one's answers.

Every backend's answer is stripped of leading and trailing whitespace before it is cached and
scored, as the official generation scripts do with a model's decoded output (LLaVA's
`model_vqa*`: `outputs.strip()`): the same text scores the same whichever backend produced it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlmkit.eval.backends import Backend
from vlmkit.eval.benchmarks.base import BenchItem, Benchmark, EvalInputError, ScoreResult
from vlmkit.eval.compare import SCORES_NAME  # each item's score, cluster and groups: what `eval compare` pairs
from vlmkit.eval.stats import add_error_bars
from vlmkit.utils import atomic_write_text

CACHE_NAME = "predictions.jsonl"
META_NAME = "run.json"
# What must match for cached predictions to be reused.
META_KEYS = ("benchmark", "model", "prompt_template", "max_new_tokens")


@dataclass
class RunOutcome:
    result: ScoreResult
    out_dir: Path
    generated: int  # items answered in this invocation
    reused: int  # items taken from the cache
    seconds: float  # generation time of this invocation
    samples_per_s: float


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    # Keyed on size and mtime too, so a file changed in place is hashed again; benchmarks that ask
    # several questions about one image (VQAv2) hash it once.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def item_fingerprint(benchmark: Benchmark, item: BenchItem) -> str:
    """What the model is asked for an item: its prompt and the bytes of its images."""
    h = hashlib.sha256(json.dumps([benchmark.name, item.id, benchmark.prompt(item)], ensure_ascii=False).encode())
    for ref in item.images:
        if isinstance(ref, bytes):
            h.update(hashlib.sha256(ref).digest())
            continue
        try:
            st = os.stat(ref)
            h.update(_file_digest(os.fspath(ref), st.st_size, st.st_mtime_ns))
        except (OSError, ValueError):
            h.update(b"missing:" + str(ref).encode())  # generation will name the missing file
    return h.hexdigest()[:32]


class PredictionCache:
    """Append-only JSONL of {"id", "prediction", "item"}; tolerant of a torn last line only.

    "item" is the item's fingerprint (`item_fingerprint`); `fingerprints` holds those read by
    the last `load` (lines written before fingerprints existed have none)."""

    def __init__(self, path: Path):
        self.path = path
        self.fingerprints: dict[str, str | None] = {}

    def load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        preds: dict[str, str] = {}
        self.fingerprints = {}
        lines = raw.split(b"\n")
        torn = lines[-1]  # text after the last newline: empty, or a write cut short by a kill
        for lineno, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, pred = str(rec["id"]), rec["prediction"]
                if not isinstance(pred, str):
                    raise TypeError("prediction is not a string")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
                raise EvalInputError(
                    f"{self.path}:{lineno}: malformed cache line ({type(e).__name__}: {e}); "
                    "the file is left untouched: fix or remove that line and rerun"
                ) from None
            preds.setdefault(key, pred)
            self.fingerprints.setdefault(key, rec.get("item"))
        if torn.strip():
            try:
                rec = json.loads(torn)
                if not isinstance(rec["prediction"], str):
                    raise TypeError("prediction is not a string")
                preds.setdefault(str(rec["id"]), rec["prediction"])
                self.fingerprints.setdefault(str(rec["id"]), rec.get("item"))
                with open(self.path, "ab") as f:  # complete line, only its newline was lost
                    f.write(b"\n")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                warnings.warn(f"{self.path}: dropping an incomplete last line left by an interrupted run", stacklevel=2)
                with open(self.path, "r+b") as f:
                    f.truncate(len(raw) - len(torn))
        return preds

    def append(self, records: Sequence[tuple[str, str] | tuple[str, str, str]]) -> None:
        """(id, prediction) or (id, prediction, item fingerprint) records."""
        data = "".join(json.dumps({"id": r[0], "prediction": r[1], **({"item": r[2]} if len(r) > 2 else {})},
                                  ensure_ascii=False) + "\n" for r in records)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_cached_items(out_dir: Path, cache: PredictionCache, cached: dict[str, str], fingerprints: dict[str, str]) -> None:
    """Refuse a cache whose predictions were made for other data under the same ids."""
    stale = [k for k, fp in fingerprints.items() if k in cached and cache.fingerprints.get(k) != fp]
    if not stale:
        return
    legacy = all(cache.fingerprints.get(k) is None for k in stale)
    why = ("were cached without a fingerprint of their data (by an older vlmkit)" if legacy
           else "were made for different data (another dataset, or changed questions or images)")
    raise EvalInputError(
        f"{out_dir}: cached predictions for {len(stale)} item(s), e.g. {stale[0]!r}, {why}; "
        "use another --out (or delete its predictions.jsonl to start afresh)")


def _check_meta(out_dir: Path, meta: dict[str, Any], write: bool = True) -> None:
    path = out_dir / META_NAME
    if path.exists():
        try:
            old = json.loads(path.read_bytes())
            if not isinstance(old, dict):
                raise TypeError("not an object")
        except (OSError, ValueError, TypeError, RecursionError):  # ValueError: bad JSON or not UTF-8
            raise EvalInputError(f"{path}: unreadable run description; move the folder away to start afresh") from None
        diff = [k for k in META_KEYS if old.get(k) != meta.get(k)]
        if diff and (out_dir / CACHE_NAME).exists():
            details = "; ".join(f"{k}: cached {old.get(k)!r} vs now {meta.get(k)!r}" for k in diff)
            raise EvalInputError(f"{out_dir}: cached predictions come from a different run ({details}); use another --out")
    if write:
        atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def run_benchmark(
    benchmark: Benchmark,
    items: list[BenchItem],
    backend: Backend,
    out_dir: str | os.PathLike,
    *,
    model_spec: str,
    data_dir: str = "",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> RunOutcome:
    out = Path(out_dir)
    _check_unique_ids(benchmark, items)
    out.mkdir(parents=True, exist_ok=True)
    max_new = max_new_tokens or benchmark.default_max_new_tokens
    meta = {"benchmark": benchmark.name, "model": model_spec, "data": str(data_dir),
            "prompt_template": benchmark.prompt_template, "parser": benchmark.parser, "metric": benchmark.metric,
            "max_new_tokens": max_new, "batch_size": batch_size}
    world = _EvalWorld()
    try:
        # Everything is checked before run.json is rewritten: a refused run changes nothing.
        state = _load_cached_predictions(out, benchmark, items, meta)
        if world.rank == 0:
            _check_meta(out, meta)
        world.barrier()
        todo = [it for it in items if it.id not in state.cached]
        writer = state.cache if world.size == 1 else PredictionCache(out / RANK_CACHE.format(rank=world.rank))
        reused = len(items) - len(todo)
        bar = tqdm(total=len(items), initial=reused, desc=f"eval {benchmark.name}", unit="item",
                   disable=not progress or world.rank != 0)
        t0 = time.perf_counter()
        try:
            # The bar counts every rank's items: the others answer batches of the same size.
            _answer_items(benchmark, backend, _share_of_rank(todo, world), state, writer, max_new, batch_size,
                          advance=lambda n: bar.update(n * world.size))
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        _gather_rank_caches(out, state, world)
    finally:
        world.close()

    known = {it.id for it in items}
    result = add_error_bars(benchmark, benchmark.score(items, {k: v for k, v in state.cached.items() if k in known}))
    generated = len(todo)
    outcome = RunOutcome(result, out, generated, reused, seconds,
                         generated / seconds if seconds > 0 and generated else 0.0)
    if world.rank == 0:
        write_results(outcome, meta, benchmark)
    return outcome


def _check_unique_ids(benchmark: Benchmark, items: list[BenchItem]) -> None:
    # Predictions are cached by id: the second item would be answered with the first's answer.
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = sorted({i for i in ids if i in seen or seen.add(i)})
        raise EvalInputError(f"{len(dups)} duplicate item id(s) in the {benchmark.name} items, e.g. {dups[0]!r}; "
                             "each item needs its own id")


@dataclass
class _CacheState:
    cache: PredictionCache  # the main cache
    cached: dict[str, str]  # predictions by item id: the main cache's and any rank cache's
    fingerprints: dict[str, str]  # item id -> `item_fingerprint` of this run's items
    rank_caches: list[Path]  # rank caches found at the start (left by an interrupted run)


def _load_cached_predictions(out: Path, benchmark: Benchmark, items: list[BenchItem], meta: dict[str, Any]) -> _CacheState:
    """The predictions a rerun may reuse, after checking that they were made by the same run
    settings for the same data (writes nothing)."""
    _check_meta(out, meta, write=False)
    cache = PredictionCache(out / CACHE_NAME)
    cached = cache.load()
    # Rank caches left by an interrupted data-parallel run count as cached too.
    rank_caches = sorted(out.glob(RANK_CACHE_GLOB))
    for path in rank_caches:
        extra = PredictionCache(path)
        for key, pred in extra.load().items():
            if key not in cached:
                cached[key] = pred
                cache.fingerprints.setdefault(key, extra.fingerprints.get(key))
    fingerprints = {it.id: item_fingerprint(benchmark, it) for it in items}
    _check_cached_items(out, cache, cached, fingerprints)
    return _CacheState(cache, cached, fingerprints, rank_caches)


def _share_of_rank(todo: list[BenchItem], world: _EvalWorld) -> list[BenchItem]:
    """Each rank takes a contiguous share, so its batches are the ones one process would form
    (when the batch size divides the share) and it appends to a cache of its own."""
    base, extra_items = divmod(len(todo), world.size)
    start = world.rank * base + min(world.rank, extra_items)
    return todo[start : start + base + (world.rank < extra_items)]


def _answer_items(benchmark: Benchmark, backend: Backend, mine: list[BenchItem], state: _CacheState,
                  writer: PredictionCache, max_new: int, batch_size: int, advance: Callable[[int], None]) -> None:
    """Answer `mine` in batches; each batch is appended to `writer` (and to `state.cached`) as
    soon as it is answered, then reported to `advance`."""
    for at in range(0, len(mine), batch_size):
        chunk = mine[at : at + batch_size]
        answers = _ask(backend, [benchmark.request(it) for it in chunk], max_new)
        writer.append([(it.id, a, state.fingerprints[it.id]) for it, a in zip(chunk, answers)])
        state.cached.update((it.id, a) for it, a in zip(chunk, answers))
        advance(len(chunk))


def _gather_rank_caches(out: Path, state: _CacheState, world: _EvalWorld) -> None:
    """Once every rank has answered its share, rank 0 merges the rank caches (this run's, or
    those an interrupted run left) into the main cache, and every rank reads the merged cache."""
    world.barrier()
    if world.size > 1 or state.rank_caches:
        if world.rank == 0:
            _merge_rank_caches(out, state.cache)
        world.barrier()
        state.cached = state.cache.load()


def _ask(backend: Backend, requests: list, max_new: int) -> list[str]:
    """The backend's answers to one batch, checked and stripped (every backend alike: see the
    module docstring)."""
    answers = backend.generate(requests, max_new)
    if len(answers) != len(requests):
        raise RuntimeError(f"backend {backend.name} returned {len(answers)} answers for {len(requests)} requests")
    if not all(isinstance(a, str) for a in answers):
        raise RuntimeError(f"backend {backend.name} returned a non-string answer")
    return [a.strip() for a in answers]


RANK_CACHE = "predictions.rank{rank}.jsonl"
RANK_CACHE_GLOB = "predictions.rank*.jsonl"


def _merge_rank_caches(out: Path, cache: PredictionCache) -> None:
    """Append every rank's predictions (in rank order) to the main cache, then drop the rank
    files. Appending first and deleting after means a kill in between loses nothing."""
    have = cache.load()
    for path in sorted(out.glob(RANK_CACHE_GLOB), key=lambda p: int(p.name.split(".rank")[1].split(".")[0])):
        part = PredictionCache(path)
        new = [(k, v, part.fingerprints.get(k)) for k, v in part.load().items() if k not in have]
        cache.append([r if r[2] is not None else r[:2] for r in new])
        have.update((k, v) for k, v, _ in new)
    for path in out.glob(RANK_CACHE_GLOB):
        path.unlink()


class _EvalWorld:
    """The torchrun world an evaluation runs in (one process when WORLD_SIZE is unset); joins a
    gloo group only for barriers, so it works the same next to any backend."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._owns = False
        if self.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._owns = True

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns = False


def scores_jsonl(result: ScoreResult, benchmark: Benchmark) -> str:
    """One line per scored item: {"id", "score", "cluster", "groups"}."""
    member: dict[str, list[str]] = {}
    for name, ids in result.groups.items():
        for i in ids:
            member.setdefault(i, []).append(name)
    return "".join(json.dumps({"id": i, "score": v, "cluster": benchmark.cluster_key(i), "groups": member.get(i, [])},
                              ensure_ascii=False) + "\n" for i, v in result.per_item.items())


def write_results(outcome: RunOutcome, meta: dict[str, Any], benchmark: Benchmark | None = None) -> None:
    r = outcome.result
    if benchmark is not None:
        atomic_write_text(outcome.out_dir / SCORES_NAME, scores_jsonl(r, benchmark))
    record = {**r.to_json(), "model": meta["model"], "data": meta["data"], "prompt_template": meta["prompt_template"],
              "max_new_tokens": meta["max_new_tokens"], "batch_size": meta["batch_size"],
              "generated": outcome.generated, "reused_from_cache": outcome.reused,
              "generation_seconds": round(outcome.seconds, 3), "samples_per_s": round(outcome.samples_per_s, 3)}
    atomic_write_text(outcome.out_dir / "results.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(outcome.out_dir / "results.md", results_markdown(r, meta))
    with open(outcome.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **{k: v for k, v in record.items() if k != "extra"}}) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _ci_cell(r: ScoreResult, key: str) -> str:
    ci = r.ci.get(key)
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "—"


def results_markdown(r: ScoreResult, meta: dict[str, Any]) -> str:
    lines = [
        f"# {r.benchmark} — {meta['model']}",
        "",
        "| benchmark | score | overall | 95% CI | items | missing | metric | parser | prompt |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {r.benchmark} | {_cell(r.display)} | {r.overall:.4f} | {_ci_cell(r, 'overall')} | {r.n_items} "
         f"| {r.n_missing} | {_cell(r.metric)} | {_cell(r.parser)} | `{_cell(meta['prompt_template'])}` |"),
        "",
    ]
    if r.scorer:
        lines += [f"Scorer: {_cell(r.scorer['scorer'])} ({_cell(r.scorer['version'])}), following {_cell(r.scorer['source'])}.", ""]
    if r.breakdown:
        lines += ["| category | score | 95% CI |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {v:.4f} | {_ci_cell(r, k)} |" for k, v in r.breakdown.items()]
        lines.append("")
    counters = {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool))}
    if counters:
        lines.append("Notes: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
        lines.append("")
    return "\n".join(lines)
