"""DocVQA (Mathew et al. 2021): questions over scanned industry documents, scored by ANLS."""

from __future__ import annotations

from collections import defaultdict

from vlmkit.eval.metrics import anls
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


class DocVQA(Benchmark):
    name = "docvqa"
    metric = "ANLS, threshold 0.5 (Robust Reading Competition DocVQA task 1 evaluation script)"
    parser = "none (the raw response is the answer)"
    prompt_template = "{question}\\nAnswer the question using a single word or phrase."
    default_max_new_tokens = 32

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        path = find_first(root, ["val_v1.0.json", "val/val_v1.0.json", "val_v1.0_withQT.json"], "DocVQA val_v1.0.json")
        doc = read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise EvalInputError(f'{path}: expected an object with a "data" list')
        base = path.parent
        items = []
        for i, r in enumerate(doc["data"]):
            try:
                if "answers" not in r:
                    raise EvalInputError(f"{path}: data[{i}] has no answers (the test split is scored on the RRC server)")
                if not isinstance(r["answers"], list):
                    raise TypeError("'answers' (not a list)")
                items.append(BenchItem(id=str(r["questionId"]), question=r["question"], images=[base / r["image"]],
                                       answers=[str(a) for a in r["answers"]],
                                       metadata={"question_types": list(r.get("question_types") or []),
                                                 "docId": r.get("docId")}))
            except (KeyError, TypeError) as e:
                raise EvalInputError(f"{path}: data[{i}]: missing or malformed field {e}") from None
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return f"{item.question}\nAnswer the question using a single word or phrase."

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item = {it.id: anls(predictions[it.id], it.answers) if it.id in predictions else 0.0 for it in items}
        by_type: dict[str, list[float]] = defaultdict(list)
        for it in items:
            for t in it.metadata["question_types"]:
                by_type[t].append(per_item[it.id])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{overall:.4f}",
            breakdown={t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            per_item=per_item, groups=group_ids(items, lambda it: it.metadata["question_types"]),
        )


BENCHMARKS.register("docvqa")(DocVQA)
