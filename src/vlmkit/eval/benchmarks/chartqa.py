"""ChartQA (Masry et al. 2022): questions over charts, human-written and machine-generated splits."""

from __future__ import annotations

from pathlib import Path

from vlmkit.eval.metrics import chartqa_score
from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    group_ids,
    read_json_list,
    require_dir,
)

SPLITS = ("test_human", "test_augmented")


class ChartQA(Benchmark):
    name = "chartqa"
    metric = "relaxed accuracy: 5% numeric tolerance, exact match otherwise (google-research/pix2struct relaxed_correctness)"
    parser = "none (the raw response is the answer, as in pix2struct)"
    prompt_template = "{query}\\nAnswer the question using a single word or phrase."
    default_max_new_tokens = 32

    def _test_dir(self, root: Path) -> Path:
        for cand in (root / "test", root):
            if any((cand / f"{s}.json").is_file() for s in SPLITS):
                return cand
        raise EvalInputError(f"{root}: no ChartQA test/test_human.json or test/test_augmented.json found")

    def load(self, data_dir) -> list[BenchItem]:
        test = self._test_dir(require_dir(data_dir))
        items, sources = [], []
        for split in SPLITS:
            path = test / f"{split}.json"
            if not path.is_file():
                continue
            rows = read_json_list(path)
            for i, r in enumerate(rows):
                try:
                    items.append(BenchItem(id=f"{split}/{i}", question=r["query"], images=[test / "png" / r["imgname"]],
                                           answers=[str(r["label"])], metadata={"split": split, "imgname": r["imgname"]}))
                    sources.append(path)
                except (KeyError, TypeError) as e:
                    raise EvalInputError(f"{path}: row {i}: missing or malformed field {e}") from None
        return checked_items(items, sources)

    def prompt(self, item: BenchItem) -> str:
        return f"{item.question}\nAnswer the question using a single word or phrase."

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item = {it.id: chartqa_score(predictions[it.id], it.answers) if it.id in predictions else 0.0 for it in items}
        breakdown = {}
        for split in SPLITS:
            vals = [per_item[it.id] for it in items if it.metadata["split"] == split]
            if vals:
                breakdown[split] = sum(vals) / len(vals)
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{100 * overall:.2f}", breakdown=breakdown,
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"average_of_splits": sum(breakdown.values()) / len(breakdown) if breakdown else 0.0},
            per_item=per_item, groups=group_ids(items, lambda it: [it.metadata["split"]]),
        )


BENCHMARKS.register("chartqa")(ChartQA)
