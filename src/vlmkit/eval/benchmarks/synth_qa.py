"""`synth-qa`: the quickstart's held-out synthetic questions (bar charts, written words, shape
scenes), each scored by the official rule of the benchmark its task imitates.

Charts are scored with ChartQA's relaxed accuracy, written words with OCRBench's matching rule
for its text-recognition sets, scenes with VQA-normalised exact match. The breakdown is per
question kind (`word`, `bar`, `count`, `colour`, `shape`) and per task.
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
}


def score_answer(task: str, prediction: str, answer: str) -> bool:
    """One answer, by the rule of the task's benchmark."""
    if task == "chart":
        return relaxed_correctness(answer, prediction)
    if task == "text":
        return ocrbench_correct(prediction, answer, "IIIT5K")  # a "Text Recognition" dataset rule
    return vqa_normalize(prediction) == vqa_normalize(answer)


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
                                       metadata={"task": rec["task"], "kind": question_kind(rec)}))
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
            groups.setdefault(it.metadata["kind"], []).append(per_item[it.id])
            groups.setdefault(f"task/{it.metadata['task']}", []).append(per_item[it.id])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(it.id in predictions for it in items)
        return ScoreResult(self.name, overall, f"{100 * overall:.1f}", {k: sum(v) / len(v) for k, v in sorted(groups.items())},
                           self.metric, self.parser, n, n_pred, n - n_pred, per_item=per_item,
                           groups=group_ids(items, lambda it: [it.metadata["kind"], f"task/{it.metadata['task']}"]))
