"""`custom`: your own held-out file, in any record format training reads (LLaVA `conversations`,
OpenAI / TRL `messages`, JSON or JSONL; `vlmkit.data.formats`).

Each record's last assistant turn is the reference answer; every turn before it is the prompt
(one user turn is the usual case; a system turn or earlier exchanges are asked as they stand).
Answers are scored by a named metric (`METRICS`), chosen as `custom:FILE?metric=NAME` (or
`benchmark: custom?metric=NAME` in `train.eval`); the default is `exact`. The breakdown is per
record `task` (or `category`) where the records carry one.

A record that cannot be scored (no assistant turn, an empty answer, a missing image, a record
training would refuse) is an error that names the file, the record's id or line and the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from vlmkit.core.types import BadRecordError, Message
from vlmkit.data.formats import read_json_records, record_to_sample
from vlmkit.eval.metrics import anls, relaxed_correctness, vqa_normalize
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, checked_items, group_ids, read_jsonl
from .synth_media import MediaItem


def normalise(text: str) -> str:
    """The usual answer normalisation: lower-case, then VQA's (punctuation dropped, articles
    dropped, number words as digits), whitespace collapsed."""
    return " ".join(vqa_normalize(text.lower()).split())


def exact(prediction: str, answer: str) -> float:
    return float(normalise(prediction) == normalise(answer))


def contains(prediction: str, answer: str) -> float:
    """The normalised answer appears in the normalised prediction as whole words ("It is a red
    square." contains "red square"; "bored" does not contain "red")."""
    want = normalise(answer)
    return float(bool(want) and f" {want} " in f" {normalise(prediction)} ")


def relaxed(prediction: str, answer: str) -> float:
    """ChartQA's relaxed accuracy (a number within 5% of the answer), else normalised exact match."""
    return float(relaxed_correctness(answer.strip(), prediction.strip()) or exact(prediction, answer))


def anls_score(prediction: str, answer: str) -> float:
    return anls(prediction, [answer])


# name -> (scorer of one answer, what it is, as recorded with the scores)
METRICS: dict[str, tuple[Callable[[str, str], float], str]] = {
    "exact": (exact, "exact match after normalisation (lower-case, VQA punctuation / article / number-word rules)"),
    "contains": (contains, "the normalised answer appears in the normalised response as whole words"),
    "relaxed": (relaxed, "ChartQA relaxed accuracy (numbers within 5%), else normalised exact match"),
    "anls": (anls_score, "ANLS (DocVQA: 1 - normalised edit distance, 0 below 0.5)"),
}

_PLACEHOLDER = re.compile(r"<(image|video)>")


@BENCHMARKS.register("custom")
class CustomBench(Benchmark):
    """A user's held-out file, scored by a named metric (see the module docstring)."""

    name = "custom"
    parser = "none (the raw response is the answer)"
    prompt_template = "the record's turns before its last assistant turn"
    default_max_new_tokens = 32

    def __init__(self, metric: str = "exact"):
        if metric not in METRICS:
            raise EvalInputError(f"custom: unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        self.metric_name = metric
        self.metric = f"{metric}: {METRICS[metric][1]}"

    def load(self, data_dir) -> list[BenchItem]:
        path = Path(data_dir)
        if path.is_dir():
            raise EvalInputError(f"{path}: custom takes a file of records (JSON or JSONL), not a folder")
        items, problems = [], []
        for where, index, rec in _records(path):
            try:
                items.append(_item(rec, index, path.parent, where))
            except BadRecordError as e:
                problems.append(str(e))
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise EvalInputError(f"{len(problems)} record(s) of {path} cannot be scored{more}:\n  " + "\n  ".join(problems[:5]))
        if not items:
            raise EvalInputError(f"{path}: no records")
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def request(self, item: BenchItem):
        turns = item.metadata["turns"]
        return (turns[0].content if len(turns) == 1 else turns), item.load_images()

    def score(self, items: list[BenchItem], predictions: dict[str, str]) -> ScoreResult:
        scorer = METRICS[self.metric_name][0]
        per_item = {it.id: scorer(predictions[it.id], it.answers[0]) if it.id in predictions else 0.0 for it in items}
        groups: dict[str, list[float]] = {}
        for it in items:
            if it.metadata.get("task"):
                groups.setdefault(it.metadata["task"], []).append(per_item[it.id])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(it.id in predictions for it in items)
        return ScoreResult(self.name, overall, f"{100 * overall:.1f}", {k: sum(v) / len(v) for k, v in sorted(groups.items())},
                           self.metric, self.parser, n, n_pred, n - n_pred, per_item=per_item,
                           groups=group_ids(items, lambda it: [it.metadata.get("task") or None]))


def _records(path: Path):
    """(where, index, record) for each record: `where` is the file and, for JSONL, the line, so an
    error names the line a user opens."""
    if path.suffix == ".jsonl":
        for index, (lineno, rec) in enumerate(read_jsonl(path)):
            yield f"{path}:{lineno}", index, rec
        return
    try:
        records = read_json_records(path, "held-out")
    except (FileNotFoundError, ValueError) as e:
        raise EvalInputError(str(e)) from None
    for index, rec in enumerate(records):
        yield str(path), index, rec


def _item(rec, index: int, root: Path, where: str) -> MediaItem:
    """One record as a question: the turns before its last assistant turn, that turn's text as
    the answer. Raises BadRecordError naming the record."""
    sample = record_to_sample(rec, index, root, where)
    rid = sample.id  # the record's id, or #index without one
    last = max((i for i, m in enumerate(sample.messages) if m.role == "assistant"), default=None)
    if last is None:
        raise BadRecordError(rid, "has no assistant turn, so no reference answer (the last assistant turn is the answer)", where)
    answer = sample.messages[last].content.strip()
    if not answer:
        raise BadRecordError(rid, "has an empty answer (its last assistant turn)", where)
    turns = sample.messages[:last]
    if not any(m.role == "user" for m in turns):
        raise BadRecordError(rid, "has no user turn before its answer, so nothing to ask", where)
    for ref in [*sample.images, *sample.videos]:
        if isinstance(ref, Path) and not ref.is_file():
            raise BadRecordError(rid, f"image or video not found: {ref}", where)
    media = _media_in_order(turns, sample.images, sample.videos)
    # The backends' convention: one `<image>` per visual input; the input decides how it expands.
    turns = [Message(m.role, _PLACEHOLDER.sub("<image>", m.content)) for m in turns]
    question = turns[0].content if len(turns) == 1 else json.dumps([[m.role, m.content] for m in turns], ensure_ascii=False)
    task = rec.get("task", rec.get("category")) if isinstance(rec, dict) else None
    return MediaItem(id=rid, question=question, images=[p for _, p in media], answers=[answer],
                     metadata={"task": str(task) if task is not None else "", "turns": turns}, media=media)


def _media_in_order(turns: list[Message], images: list, videos: list) -> list[tuple[str, Path | bytes]]:
    """The record's images and videos in the order their placeholders appear; without one
    placeholder per input, images then videos (the backend puts them before the text)."""
    kinds = [m.group(1) for t in turns for m in _PLACEHOLDER.finditer(t.content)]
    if kinds.count("image") != len(images) or kinds.count("video") != len(videos):
        return [("image", p) for p in images] + [("video", p) for p in videos]
    it_img, it_vid = iter(images), iter(videos)
    return [(k, next(it_img) if k == "image" else next(it_vid)) for k in kinds]
