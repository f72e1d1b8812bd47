"""VQAv2 (Goyal et al. 2017) and TextVQA (Singh et al. 2019): 10 human answers per question."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from vlmkit.eval.metrics import vqa_accuracy
from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    group_ids,
    read_json,
    require_dir,
)

PROMPT = "{question}\nAnswer the question using a single word or phrase."


def _one(root: Path, pattern: str, what: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise EvalInputError(f"{root}: expected exactly one {what} ({pattern}), found {len(found)}")
    return found[0]


def load_questions_annotations(root: Path, image_path) -> list[BenchItem]:
    """The VQA layout: a questions file and an annotations file joined on question_id."""
    qpath = _one(root, "*questions*.json", "questions file")
    apath = _one(root, "*annotations*.json", "annotations file")
    qdoc, adoc = read_json(qpath), read_json(apath)
    if not isinstance(qdoc, dict) or "questions" not in qdoc:
        raise EvalInputError(f'{qpath}: expected an object with a "questions" list')
    if not isinstance(adoc, dict) or "annotations" not in adoc:
        raise EvalInputError(f'{apath}: expected an object with an "annotations" list')
    anns = {}
    for i, a in enumerate(adoc["annotations"]):
        try:
            qid = a["question_id"]
        except (KeyError, TypeError):
            raise EvalInputError(f"{apath}: annotations[{i}] has no question_id") from None
        if qid in anns:
            raise EvalInputError(f"{apath}: annotations[{i}]: question_id {qid!r} is annotated twice")
        anns[qid] = a
    subtype = qdoc.get("data_subtype", "val2014")
    items = []
    for i, q in enumerate(qdoc["questions"]):
        try:
            a = anns[q["question_id"]]
            if not isinstance(a["answers"], list):
                raise EvalInputError(f"{apath}: question_id {q['question_id']!r}: \"answers\" must be a list")
            answers = [x["answer"] if isinstance(x, dict) else str(x) for x in a["answers"]]
            items.append(BenchItem(id=str(q["question_id"]), question=q["question"],
                                   images=[image_path(root, subtype, q["image_id"])], answers=answers,
                                   metadata={"answer_type": a.get("answer_type"), "question_type": a.get("question_type"),
                                             "image_id": q["image_id"]}))
        except KeyError as e:
            raise EvalInputError(f"{qpath}: questions[{i}]: missing field or annotation {e}") from None
    return checked_items(items, qpath)


class _VQABase(Benchmark):
    metric = "VQA accuracy: min(#humans that said it / 3, 1), averaged over leave-one-out subsets (GT-Vision-Lab/VQA vqaEval.py)"
    parser = "VQA answer normalisation (punctuation, digits, articles, contractions)"
    prompt_template = PROMPT.replace("\n", "\\n")
    default_max_new_tokens = 16
    always_normalize = False

    def prompt(self, item: BenchItem) -> str:
        return PROMPT.format(question=item.question)

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item = {it.id: vqa_accuracy(predictions[it.id], it.answers, self.always_normalize) if it.id in predictions else 0.0
                    for it in items}
        by_type: dict[str, list[float]] = defaultdict(list)
        for it in items:
            if it.metadata.get("answer_type"):
                by_type[it.metadata["answer_type"]].append(per_item[it.id])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{100 * overall:.2f}",
            breakdown={t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            per_item=per_item, groups=group_ids(items, lambda it: [it.metadata.get("answer_type") or None]),
        )


class VQAv2(_VQABase):
    name = "vqav2"

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        return load_questions_annotations(
            root, lambda r, sub, iid: r / sub / f"COCO_{sub}_{int(iid):012d}.jpg")


class TextVQA(_VQABase):
    name = "textvqa"
    metric = "VQA accuracy with answers always normalised (TextVQA / EvalAI evaluator, facebookresearch/mmf TextVQAAccuracyEvaluator)"
    always_normalize = True

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        single = sorted(root.glob("TextVQA_*.json"))
        if not single:
            return load_questions_annotations(root, lambda r, sub, iid: r / "train_images" / f"{iid}.jpg")
        path = single[0]
        doc = read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise EvalInputError(f'{path}: expected an object with a "data" list')
        items = []
        for i, r in enumerate(doc["data"]):
            try:
                if not isinstance(r["answers"], list):
                    raise TypeError("'answers' (not a list)")
                items.append(BenchItem(id=str(r["question_id"]), question=r["question"],
                                       images=[root / "train_images" / f"{r['image_id']}.jpg"],
                                       answers=[str(a) for a in r["answers"]],
                                       metadata={"image_id": r["image_id"], "image_classes": r.get("image_classes")}))
            except (KeyError, TypeError) as e:
                raise EvalInputError(f"{path}: data[{i}]: missing or malformed field {e}") from None
        return checked_items(items, path)


BENCHMARKS.register("vqav2")(VQAv2)
BENCHMARKS.register("textvqa")(TextVQA)
