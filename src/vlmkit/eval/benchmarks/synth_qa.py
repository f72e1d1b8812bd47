"""`synth-qa`: the quickstart's held-out synthetic questions (bar charts, written words, shape
scenes), each scored by the official rule of the benchmark its task imitates.

Charts are scored with ChartQA's relaxed accuracy, written words with OCRBench's matching rule
for its text-recognition sets, scenes with VQA-normalised exact match. The `fidelity` data's
words and numbers are read exactly: a word matches case-insensitively, a number only as the same
number (no 5% slack: a table cell or a bar label is read, not estimated). In both, the reply is
first stripped of surrounding white space, quotes and end punctuation. The breakdown is per
question kind (`word`, `bar`, `count`, `colour`, `shape`, and the fidelity kinds) and per task.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.data.synthetic.tasks import question_kind
from vlmkit.eval.metrics import ocrbench_correct, relaxed_correctness, vqa_normalize
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, checked_items, group_ids, read_json_list

METRIC_NAMES = {
    "chart": "ChartQA relaxed accuracy",
    "text": "OCRBench matching rule",
    "scene": "VQA-normalised exact match",
    "fidelity-word": "exact word, case-insensitive",
    "fidelity-number": "exact number",
}
_TRIM = " \t\n\"'`.,;:!?"


def exact_word(prediction: str, answer: str) -> bool:
    """The reply, trimmed, is the word (case-insensitive): "Apple." reads apple, "an apple" does not."""
    return prediction.strip(_TRIM).lower() == answer.strip().lower()


def exact_number(prediction: str, answer: str) -> bool:
    """The reply, trimmed, is the answer's number: "42", "42.0" and "42." read 42; "41", "about 42"
    and "420" do not."""
    try:
        return float(prediction.strip(_TRIM)) == float(answer)
    except ValueError:
        return False


def score_answer(task: str, prediction: str, answer: str) -> bool:
    """One answer, by the rule of the task's benchmark."""
    if task == "chart":
        return relaxed_correctness(answer, prediction)
    if task == "text":
        return ocrbench_correct(prediction, answer, "IIIT5K")  # a "Text Recognition" dataset rule
    if task == "fidelity-word":
        return exact_word(prediction, answer)
    if task == "fidelity-number":
        return exact_number(prediction, answer)
    return vqa_normalize(prediction) == vqa_normalize(answer)


def _groups(item: BenchItem) -> list[str]:
    """The breakdown an item counts in: its kind, its task, and its kind at its difficulty where
    the data grades one (`word@8px`)."""
    groups = [item.metadata["kind"], f"task/{item.metadata['task']}"]
    if "difficulty" in item.metadata:
        groups.append(f"{item.metadata['kind']}@{item.metadata['difficulty']}")
    return groups


@BENCHMARKS.register("synth-qa")
class SyntheticQA(Benchmark):
    name = "synth-qa"
    metric = "per task: ChartQA relaxed accuracy (charts), OCRBench matching rule (words), VQA-normalised exact match (scenes)"
    parser = "none (the raw response is the answer)"
    prompt_template = "<image>\\n{question}"
    default_max_new_tokens = 8

    def load(self, data_dir) -> list[BenchItem]:
        path = Path(data_dir)
        path = path / "test.json" if path.is_dir() else path
        records = read_json_list(path, "records")
        items = []
        for i, rec in enumerate(records):
            try:
                question = rec["conversations"][0]["value"].replace("<image>", "").strip()
                items.append(BenchItem(id=str(rec["id"]), question=question, images=[path.parent / rec["image"]],
                                       answers=[str(rec["answer"])],
                                       metadata={"task": rec["task"], "kind": question_kind(rec),
                                                 **({"difficulty": str(rec["difficulty"])} if "difficulty" in rec else {})}))
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise EvalInputError(f"{path}: record {i}: missing or malformed field {e}") from None
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def score(self, items: list[BenchItem], predictions: dict[str, str]) -> ScoreResult:
        per_item = {it.id: float(score_answer(it.metadata["task"], predictions[it.id], it.answers[0]))
                    if it.id in predictions else 0.0 for it in items}
        groups: dict[str, list[float]] = {}
        for it in items:
            for group in _groups(it):
                groups.setdefault(group, []).append(per_item[it.id])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(it.id in predictions for it in items)
        return ScoreResult(self.name, overall, f"{100 * overall:.1f}", {k: sum(v) / len(v) for k, v in sorted(groups.items())},
                           self.metric, self.parser, n, n_pred, n - n_pred, per_item=per_item,
                           groups=group_ids(items, _groups))
