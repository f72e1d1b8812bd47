"""What a benchmark is: a loader for its official files, a prompt, and its official scorer."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Union

from PIL import Image

from vlmkit.core.json_text import parse_json_bytes
from vlmkit.core.types import Message
from vlmkit.processing.images import ImageLoadError, load_image

ImageRef = Union[Path, bytes]


class EvalInputError(ValueError):
    """Bad benchmark files, predictions or images; the message names the file, line or item."""


@dataclass
class BenchItem:
    """One benchmark question. ``id`` is the benchmark's own id, as a string."""

    id: str
    question: str
    images: list[ImageRef]
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        out = []
        for ref in self.images:
            try:
                out.append(load_image(ref))
            except ImageLoadError as e:
                raise EvalInputError(f"item {self.id}: {e}") from None
        return out


@dataclass
class ScoreResult:
    benchmark: str
    overall: float  # fraction in [0, 1] (OCRBench: points / number of items)
    display: str  # the headline in the official script's units
    breakdown: dict[str, float]  # per-category figures, fractions like `overall`
    metric: str
    parser: str
    n_items: int
    n_predicted: int
    n_missing: int
    extra: dict[str, Any] = field(default_factory=dict)  # quirk counters, secondary metrics
    per_item: dict[str, float] = field(default_factory=dict)
    # breakdown key -> the per_item ids it averages (where the breakdown is such a mean); lets
    # each category get its own error bar and `eval compare` test it
    groups: dict[str, list[str]] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)  # "overall" or breakdown key -> [low, high]
    error_bars: dict[str, Any] = field(default_factory=dict)  # how `ci` was computed
    scorer: dict[str, str] = field(default_factory=dict)  # `Benchmark.rule()`: what produced the numbers

    def to_json(self, per_item: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d.pop("groups")
        if not per_item:
            d.pop("per_item")
        for key in ("ci", "error_bars", "scorer"):
            if not d[key]:
                d.pop(key)
        return d


class Benchmark:
    """Base class: subclasses set the class attributes and implement load/prompt/score."""

    name: ClassVar[str]
    metric: ClassVar[str]  # metric and the official source it follows
    parser: ClassVar[str]  # how a free-form response becomes an answer
    prompt_template: ClassVar[str]  # human-readable summary of the prompt, recorded with scores
    source: ClassVar[str] = ""  # the official scoring code reproduced (repository and path)
    rule_version: ClassVar[str] = "1"  # bumped whenever this class's scoring changes a number
    default_max_new_tokens: ClassVar[int] = 32

    def cluster_key(self, item_id: str) -> str:
        """The group an item was drawn with (items about one image, rotations of one question);
        error bars resample whole groups. Each item is its own group unless a benchmark says so."""
        return item_id

    def rule(self) -> dict[str, str]:
        """What produced a score, recorded in every result: the scorer, the official code it
        follows, its version, the answer-extraction rule and the prompt template."""
        from vlmkit import __version__

        return {"scorer": f"{type(self).__module__}.{type(self).__qualname__}", "metric": self.metric,
                "source": self.source or self.metric, "version": f"vlmkit {__version__}, rule {self.rule_version}",
                "answer_extraction": self.parser, "prompt_template": self.prompt_template}

    def load(self, data_dir: str | os.PathLike) -> list[BenchItem]:
        raise NotImplementedError

    def prompt(self, item: BenchItem) -> str:
        raise NotImplementedError

    def request(self, item: BenchItem) -> tuple[str | list[Message], list]:
        """What a backend is asked for `item`: the prompt (a string, or for a conversation the
        turns so far as messages) and the visual inputs in placeholder order."""
        return self.prompt(item), item.load_images()

    def score(self, items: list[BenchItem], predictions: dict[str, str]) -> ScoreResult:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# File helpers shared by the loaders
# ---------------------------------------------------------------------------------------------


def parse_json(path: Path, raw: bytes) -> Any:
    """The JSON document in `raw` (read from `path`); every failure names the file, and a key given
    twice in one object is refused (in a file keyed by id it would drop an item)."""
    return parse_json_bytes(raw, str(path), EvalInputError, unique_keys=True)


def read_json(path: Path) -> Any:
    """A benchmark's JSON file; every failure is an EvalInputError naming the file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"{path}: file not found") from None
    except OSError as e:
        raise EvalInputError(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(path, raw)


def read_json_list(path: Path, of: str = "") -> list:
    """A benchmark's JSON file that must hold a list (of `of`, as the error names them)."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise EvalInputError(f"{path}: expected a JSON list" + (f" of {of}" if of else ""))
    return rows


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a JSONL file; errors name the file and line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise EvalInputError(f"{path}: file not found") from None
    except OSError as e:
        raise EvalInputError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, parse_json(f"{path}:{lineno}", line)


def checked_items(items: list[BenchItem], source: str | os.PathLike | list, *, answers_required: bool = True) -> list[BenchItem]:
    """`items` as loaded from `source` (one file, or each item's own file), refusing what would
    score silently wrong: an id given to two items (scores and `eval run`'s cached predictions are
    keyed by id, so one would take the other's answer) and an item without any gold answer (it
    could only count as wrong)."""
    sources = source if isinstance(source, list) else [source] * len(items)
    first: dict[str, Any] = {}
    dups: list[str] = []
    for it, src in zip(items, sources):
        if answers_required and not it.answers:
            raise EvalInputError(f"{src}: item {it.id!r} has an empty answers list; every item needs a gold answer")
        if it.id in first:
            where = "" if first[it.id] == src else f" (also in {first[it.id]})"
            dups.append(f"{it.id!r}{where}")
        else:
            first[it.id] = src
    if dups:
        files = sorted({str(s) for s in sources}) if isinstance(source, list) else [str(source)]
        raise EvalInputError(
            f"{', '.join(files[:3])}: {len(dups)} duplicate item id(s): {', '.join(dups[:5])}"
            f"{', ...' if len(dups) > 5 else ''}; each item needs its own id")
    return items


def find_first(data_dir: Path, names: Iterable[str], what: str) -> Path:
    names = list(names)
    for n in names:
        p = data_dir / n
        if p.is_file():
            return p
    raise EvalInputError(f"{data_dir}: no {what} found (looked for {', '.join(names)})")


def require_dir(data_dir: str | os.PathLike) -> Path:
    p = Path(data_dir)
    if not p.is_dir():
        raise EvalInputError(f"{p}: benchmark data folder not found")
    return p


def read_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read a predictions JSONL (one {"id", "prediction"} per line). Errors name the line.

    Ids are compared as strings (DocVQA's integer questionId and "123" are the same item);
    an id given twice is an error rather than a silent overwrite.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: predictions file not found")
    preds: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict) or "id" not in rec or "prediction" not in rec:
            raise EvalInputError(f'{path}:{lineno}: expected an object with "id" and "prediction"')
        if not isinstance(rec["prediction"], str):
            raise EvalInputError(f'{path}:{lineno}: "prediction" must be a string, got {type(rec["prediction"]).__name__}')
        if isinstance(rec["id"], (dict, list)) or rec["id"] is None:
            raise EvalInputError(f'{path}:{lineno}: "id" must be a string or a number')
        key = str(rec["id"])
        if key in preds:
            raise EvalInputError(f"{path}:{lineno}: id {key!r} appears twice (first on line {lines[key]}); "
                                 "which prediction counts would be a guess")
        preds[key] = rec["prediction"]
        lines[key] = lineno
    return preds


def check_prediction_ids(name: str, items: list[BenchItem], predictions: dict[str, str]) -> None:
    known = {it.id for it in items}
    unknown = [k for k in predictions if k not in known]
    if unknown:
        sample = ", ".join(repr(u) for u in unknown[:5])
        raise EvalInputError(
            f"{len(unknown)} prediction id(s) are not {name} items (e.g. {sample}); "
            f"ids are the benchmark's own, e.g. {next(iter(known), '?')!r}"
        )


def group_ids(items: list[BenchItem], keys_of: Callable[[BenchItem], Iterable[str | None]]) -> dict[str, list[str]]:
    """Breakdown key -> the ids of the items it averages (`ScoreResult.groups`), sorted by key."""
    out: dict[str, list[str]] = {}
    for it in items:
        for key in keys_of(it):
            if key is not None:
                out.setdefault(str(key), []).append(it.id)
    return dict(sorted(out.items()))


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
