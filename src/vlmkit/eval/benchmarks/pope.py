"""POPE (Li et al. 2023): yes/no object-probing questions on COCO val2014, in three negative-
sampling splits (random, popular, adversarial), scored per split by the POPE repository's
``evaluate.py``.

The official answer rule: keep the text before the first ".", drop commas, split on spaces; the
answer is "no" when one of the words is exactly ``No``, ``no`` or ``not``, and "yes" otherwise,
so an empty answer, "NO" or "Nope" counts as yes. Question ids restart in every split, so an
item's id is ``<split>/<question_id>``.
"""

from __future__ import annotations

from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    group_ids,
    read_jsonl,
    require_dir,
)

SPLITS = ("random", "popular", "adversarial")
QUESTION_DIRS = ("output/coco", ".")
IMAGE_DIRS = ("val2014", "output/coco/val2014", ".")


def pope_answer(text: str) -> str:
    """"yes" or "no" by the POPE repository's ``evaluate.py`` rule (see the module docstring)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def confusion(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """TP/FP/TN/FN, accuracy, precision, recall, F1 and yes-ratio of (answer, label) pairs, "yes"
    being the positive class. Where the official script would divide by zero (no "yes" answer),
    the ratio is 0, as lmms-eval and VLMEvalKit report it."""
    tp = sum(a == "yes" and lab == "yes" for a, lab in pairs)
    fp = sum(a == "yes" and lab == "no" for a, lab in pairs)
    tn = sum(a == "no" and lab == "no" for a, lab in pairs)
    fn = sum(a == "no" and lab == "yes" for a, lab in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0}


class POPE(Benchmark):
    name = "pope"
    metric = ("per split accuracy, precision, recall, F1 and yes-ratio, 'yes' positive (RUCAIBox/POPE evaluate.py); "
              "headline: F1 averaged over the splits")
    parser = "POPE evaluate.py: first sentence, commas dropped, 'No'/'no'/'not' as a word -> no, else yes"
    prompt_template = "{text}"
    default_max_new_tokens = 16

    def __init__(self):
        self._images: dict[str, str] = {}  # item id -> image file name, for cluster_key

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        qdir = next((root / d for d in QUESTION_DIRS if any((root / d / f"coco_pope_{s}.json").is_file() for s in SPLITS)), None)
        if qdir is None:
            raise EvalInputError(f"{root}: no POPE question files found (looked for output/coco/coco_pope_"
                                 f"{{{','.join(SPLITS)}}}.json and the same names in the folder itself)")
        image_root = next((root / d for d in IMAGE_DIRS if (root / d).is_dir() and d != "."), root)
        items, sources = [], []
        for split in SPLITS:
            path = qdir / f"coco_pope_{split}.json"
            if not path.is_file():
                continue
            for lineno, r in read_jsonl(path):
                try:
                    label = str(r["label"]).strip().lower()
                    if label not in ("yes", "no"):
                        raise EvalInputError(f"{path}:{lineno}: label {r['label']!r} is neither 'yes' nor 'no'")
                    items.append(BenchItem(id=f"{split}/{r['question_id']}", question=r["text"],
                                           images=[image_root / r["image"]], answers=[label],
                                           metadata={"split": split, "image": r["image"]}))
                    sources.append(path)
                except (KeyError, TypeError) as e:
                    raise EvalInputError(f"{path}:{lineno}: missing or malformed field {e}") from None
        self._images.update({it.id: it.metadata["image"] for it in items})
        return checked_items(items, sources)

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def cluster_key(self, item_id: str) -> str:
        """The COCO image: every split asks several questions about each of its 500 images. Known
        for the items this instance has loaded or scored; any other id is its own cluster."""
        return self._images.get(item_id, item_id)

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        self._images.update({it.id: it.metadata["image"] for it in items})
        per_item: dict[str, float] = {}
        by_split: dict[str, list[tuple[str, str]]] = {}
        n_split: dict[str, int] = {}
        for it in items:
            split = it.metadata["split"]
            n_split[split] = n_split.get(split, 0) + 1
            if it.id not in predictions:
                per_item[it.id] = 0.0
                continue
            answer = pope_answer(predictions[it.id])
            per_item[it.id] = float(answer == it.answers[0])
            by_split.setdefault(split, []).append((answer, it.answers[0]))
        breakdown: dict[str, float] = {}
        counts: dict[str, dict[str, int]] = {}
        f1s = []
        for split in SPLITS:
            if split not in n_split:
                continue
            m = confusion(by_split.get(split, []))
            # An item without a prediction counts as wrong in the accuracy (the other figures are
            # over the answered items); with every item answered this is the official accuracy.
            m["accuracy"] = (m["TP"] + m["TN"]) / n_split[split]
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                breakdown[f"{split}/{k}"] = m[k]
            counts[split] = {k: int(m[k]) for k in ("TP", "FP", "TN", "FN")}
            f1s.append(m["f1"])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        f1_mean = sum(f1s) / len(f1s) if f1s else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall,
            display=f"F1 {100 * f1_mean:.2f} (mean of {len(f1s)} split(s)), accuracy {100 * overall:.2f}",
            breakdown=breakdown, metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred,
            n_missing=n - n_pred, extra={"f1_mean": f1_mean, "confusion": counts}, per_item=per_item,
            groups=group_ids(items, lambda it: [f"{it.metadata['split']}/accuracy"]),
        )


BENCHMARKS.register("pope")(POPE)
