"""MathVista testmini (Lu et al. 2024): 1000 math-in-visual-context problems."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from vlmkit.eval.metrics import mathvista_normalize, mathvista_quick_extract, mathvista_rule_extract
from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    find_first,
    group_ids,
    read_json,
    require_dir,
)

BREAKDOWN_KEYS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills")

# An extractor takes (response, item) and returns the extracted answer; the LLM judge is one.
Extractor = Callable[[str, BenchItem], str]


def build_query(item: BenchItem) -> str:
    """Zero-shot query in the form of MathVista's ``build_query.py`` (hint, question, choices)."""
    md = item.metadata
    if md["question_type"] == "multi_choice":
        hint = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    elif md["answer_type"] == "integer":
        hint = "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end."
    elif md["answer_type"] == "float" and int(md["precision"] or 1) == 1:
        hint = ("Please answer the question requiring a floating-point number with one decimal place and provide "
                "the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    elif md["answer_type"] == "float":
        hint = ("Please answer the question requiring a floating-point number with two decimal places and provide "
                "the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    else:
        hint = ("Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    question = item.question + (f" (Unit: {md['unit']})" if md.get("unit") else "")
    text = f"Hint: {hint}\nQuestion: {question}"
    if md.get("choices"):
        text += "\nChoices:\n" + "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(md["choices"]))
    return text


JUDGE_INSTRUCTION = (
    "Please read the following example. Then extract the answer from the model response and type it at the end "
    "of the prompt.\n\n"
    "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.\n"
    "Question: How many bars are taller than 5?\n\n"
    "Model response: Three of the bars are taller than 5, so the answer is 3.\n\n"
    "Extracted answer: 3\n\n"
    "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
    "Question: Which shape is largest?\nChoices:\n(A) circle\n(B) square\n\n"
    "Model response: The square covers the most area.\n\n"
    "Extracted answer: B\n\n"
)


def llm_judge_extractor(model: str, base_url: str | None = None) -> Extractor:
    """MathVista's LLM answer extraction (``extract_answer.py``) through an OpenAI-compatible endpoint.

    The official script asks GPT-4 with few-shot demos; this sends the same kind of prompt to
    any chat model. Only used when the quick rules do not settle the answer.
    """
    from vlmkit.eval.backends import OpenAIChatBackend  # optional judge; eval.backends imports the benchmarks

    judge = OpenAIChatBackend(model, base_url=base_url, concurrency=1)

    def extract(response: str, item: BenchItem) -> str:
        prompt = f"{JUDGE_INSTRUCTION}{build_query(item)}\n\nModel response: {response}\n\nExtracted answer: "
        return judge.generate([(prompt, [])], 64)[0].strip()

    return extract


def _breakdown_keys(item: BenchItem) -> list[str]:
    keys = []
    for key in BREAKDOWN_KEYS:
        vals = item.metadata.get(key)
        keys += [f"{key}={v}" for v in (vals if isinstance(vals, list) else [vals]) if v is not None]
    return keys


class MathVista(Benchmark):
    name = "mathvista"
    metric = "accuracy after MathVista's normalize_extracted_answer + exact match (lupantech/MathVista evaluation/calculate_score.py)"
    parser = "mathvista-rules: official quick extraction (extract_answer.py), then rule-based answer extraction; LLM judge optional"
    prompt_template = "Hint: <answer-type hint>\\nQuestion: {question} [(Unit: u)]\\n[Choices:\\n(A) ...]"
    default_max_new_tokens = 512

    def __init__(self, extractor: Extractor | None = None, extractor_name: str | None = None):
        self.extractor = extractor
        if extractor is not None:
            self.parser = extractor_name or "mathvista-llm-judge (official extraction prompt, OpenAI-compatible endpoint)"

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        path = find_first(root, ["testmini.json", "mathvista_testmini.json", "data/testmini.json"], "MathVista testmini.json")
        data = read_json(path)
        if not isinstance(data, dict):
            raise EvalInputError(f"{path}: expected a JSON object keyed by pid")
        items = []
        for pid, r in data.items():
            try:
                md = {k: r.get(k) for k in ("choices", "unit", "precision", "question_type", "answer_type")}
                md.update(r.get("metadata") or {})
                md["question_type"], md["answer_type"] = r["question_type"], r["answer_type"]
                items.append(BenchItem(id=str(r.get("pid", pid)), question=r["question"], images=[root / r["image"]],
                                       answers=[str(r["answer"])], metadata=md))
            except (KeyError, TypeError) as e:
                raise EvalInputError(f"{path}: pid {pid}: missing or malformed field {e}") from None
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return build_query(item)

    def extract(self, response: str, item: BenchItem) -> str:
        md = item.metadata
        if self.extractor is not None:
            quick = mathvista_quick_extract(response, md["question_type"], md["answer_type"], md.get("choices"))
            return quick if quick is not None else self.extractor(response, item)
        return mathvista_rule_extract(response, md["question_type"], md["answer_type"], md.get("choices"))

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item: dict[str, float] = {}
        groups: dict[str, list[float]] = defaultdict(list)
        for it in items:
            md = it.metadata
            ok = False
            if it.id in predictions:
                extraction = self.extract(predictions[it.id], it)
                norm = mathvista_normalize(extraction, md.get("choices"), md["question_type"], md["answer_type"], md.get("precision"))
                ok = norm == it.answers[0]
            per_item[it.id] = float(ok)
            for key in BREAKDOWN_KEYS:
                vals = md.get(key)
                for v in vals if isinstance(vals, list) else [vals]:
                    if v is not None:
                        groups[f"{key}={v}"].append(float(ok))
        n = len(items)
        acc = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=acc, display=f"{100 * acc:.2f}%",
            breakdown={k: sum(v) / len(v) for k, v in sorted(groups.items())},
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"correct": int(sum(per_item.values()))}, per_item=per_item, groups=group_ids(items, _breakdown_keys),
        )


BENCHMARKS.register("mathvista")(MathVista)
