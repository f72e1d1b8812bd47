"""Benchmark contamination: word n-gram overlap between training texts and benchmark items.

An item's text is its question plus its answers (and options, for multiple choice). Texts are
lower-cased, image placeholders and punctuation dropped, and split into words; an item is
contaminated when at least `threshold` of its n-grams occur anywhere in the training texts.
Items shorter than n words are compared as a whole (their single, shorter n-gram), so short
questions that appear verbatim are still caught.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmkit.core.json_text import parse_json_bytes
from vlmkit.eval.benchmarks.base import BenchItem, EvalInputError

_PLACEHOLDER = re.compile(r"<image(?:[ _]?\d+)?>", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(_PLACEHOLDER.sub(" ", text).lower())


def ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    if 0 < len(tokens) < n:
        yield tuple(tokens)
        return
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i : i + n])


def llava_texts(path: str | Path) -> Iterator[str]:
    """Every conversation turn of a LLaVA-format JSON (list of {"id","image","conversations"})."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"{path}: training file not found") from None
    except OSError as e:
        raise EvalInputError(f"{path}: cannot be read ({e.strerror or e})") from None
    data = parse_json_bytes(raw, str(path), EvalInputError)
    if not isinstance(data, list):
        raise EvalInputError(f"{path}: expected a JSON list of LLaVA samples")
    for i, sample in enumerate(data):
        convs = sample.get("conversations") if isinstance(sample, dict) else None
        if not isinstance(convs, list):
            raise EvalInputError(f"{path}: sample {i} has no \"conversations\" list")
        for turn in convs:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise EvalInputError(f"{path}: sample {i}: each turn needs a string \"value\"")
            yield turn["value"]


def item_parts(item: BenchItem) -> list[str]:
    """Question and answers (or options) as separate texts: n-grams never span two of them,
    just as a training conversation keeps question and answer in separate turns."""
    if not item.question:  # e.g. the MMMU answer dict alone: bare letters say nothing
        return []
    opts = item.metadata.get("options") or item.metadata.get("choices")
    if isinstance(opts, dict):  # letter -> option text (MMBench)
        opts = list(opts.values())
    # With options, the answer is a letter or one of the options; the options carry the text.
    extra = [str(o) for o in opts] if isinstance(opts, list) and opts else item.answers
    return [p for p in [item.question, *extra] if p]


def item_text(item: BenchItem) -> str:
    return "\n".join(item_parts(item))


@dataclass
class ContaminationReport:
    benchmark: str
    n: int
    threshold: float
    n_items: int
    n_train_texts: int
    n_contaminated: int
    contaminated_fraction: float
    ngram_overlap: float  # share of all benchmark n-grams seen in training
    examples: list[dict[str, Any]] = field(default_factory=list)  # most-overlapping items first

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def contamination_report(
    train: str | Path | Iterable[str], items: list[BenchItem], *, n: int = 8, threshold: float = 0.5, benchmark: str = ""
) -> ContaminationReport:
    item_grams = {it.id: {g for part in item_parts(it) for g in ngrams(words(part), n)} for it in items}
    wanted: set[tuple[str, ...]] = set().union(*item_grams.values()) if item_grams else set()
    # Short items produce shorter n-grams; index those lengths too, but only keep wanted ones.
    lengths = {len(g) for g in wanted}
    seen: set[tuple[str, ...]] = set()
    n_texts = 0
    texts = llava_texts(train) if isinstance(train, (str, Path)) else train
    for text in texts:
        n_texts += 1
        toks = words(text)
        for L in lengths:
            for i in range(len(toks) - L + 1):
                g = tuple(toks[i : i + L])
                if g in wanted:
                    seen.add(g)
    examples = []
    contaminated = 0
    text_by_id = {it.id: item_text(it) for it in items}
    for key, grams in item_grams.items():
        if not grams:
            continue
        frac = len(grams & seen) / len(grams)
        if frac >= threshold:
            contaminated += 1
        if frac > 0:
            examples.append({"id": key, "overlap": frac, "text": text_by_id[key]})
    examples.sort(key=lambda e: -e["overlap"])
    total = sum(len(g) for g in item_grams.values())
    hit = sum(len(g & seen) for g in item_grams.values())
    return ContaminationReport(
        benchmark=benchmark, n=n, threshold=threshold, n_items=len(items), n_train_texts=n_texts,
        n_contaminated=contaminated, contaminated_fraction=contaminated / len(items) if items else 0.0,
        ngram_overlap=hit / total if total else 0.0, examples=examples[:50],
    )
