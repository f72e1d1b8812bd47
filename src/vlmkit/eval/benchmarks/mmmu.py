"""MMMU (Yue et al. 2024): college-level multi-discipline questions, 30 subjects in 6 disciplines."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlmkit.eval.metrics import (
    MMMU_DOMAINS,
    MMMUParser,
    instance_weighted_accuracy,
    mmmu_eval_multi_choice,
    mmmu_eval_open,
    parse_open_response,
)
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
    read_json_list,
    require_dir,
)

QUESTION_FILES = ("validation.json", "mmmu_validation.json", "dev.json", "test.json")
ANSWER_DICT_FILES = ("answer_dict_val.json", "mmmu_answer_dict_val.json")
# Without the question files the options are unknown; MMMU has at most 9 options (A-I).
FALLBACK_CHOICES = tuple("ABCDEFGHI")
SUBJECT_TO_DOMAIN = {s: d for d, subs in MMMU_DOMAINS.items() for s in subs}


def subject_of(item_id: str) -> str:
    """`validation_Art_Theory_12` -> `Art_Theory`, as the official scripts split ids."""
    return "_".join(item_id.split("_")[1:-1])


def _parse_options(raw: Any, where: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(o) for o in raw]
    try:
        opts = ast.literal_eval(raw)  # MMMU writes the list as a Python literal string
    except (ValueError, SyntaxError):
        raise EvalInputError(f"{where}: options {raw!r} is not a list literal") from None
    return [str(o) for o in opts]


def _parse_answer(raw: Any) -> list[str]:
    if isinstance(raw, (list, tuple)):
        return [str(a) for a in raw]
    s = str(raw)
    if s.startswith("[") and s.endswith("]"):
        try:
            return [str(a) for a in ast.literal_eval(s)]
        except (ValueError, SyntaxError):
            pass
    return [s]


class MMMU(Benchmark):
    name = "mmmu"
    metric = "accuracy, instance-weighted per discipline and overall (MMMU-Benchmark/MMMU eval/eval_utils.py, main_eval_only.py)"
    parser = "MMMU parse_multi_choice_response (seeded random fallback, seed 42) / parse_open_response"
    prompt_template = ("{question}\\n\\n(A) opt\\n(B) opt\\n...\\n\\nAnswer with the option's letter from the given choices "
                       "directly. | open: {question}\\n\\nAnswer the question using a single word or phrase.")
    default_max_new_tokens = 128

    def __init__(self, random_fallback: bool = True):
        self.random_fallback = random_fallback

    # -- loading --------------------------------------------------------------------------
    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        parquets = sorted(root.glob("*/*.parquet")) + sorted(root.glob("*.parquet"))
        if parquets:
            return self._load_parquet(root, parquets)
        for name in QUESTION_FILES:
            if (root / name).is_file():
                return self._load_json(root, root / name)
        for name in ANSWER_DICT_FILES:
            if (root / name).is_file():
                return self._load_answer_dict(root / name)
        raise EvalInputError(
            f"{root}: no MMMU files found (per-subject */*.parquet, one of {', '.join(QUESTION_FILES)}, "
            f"or {', '.join(ANSWER_DICT_FILES)})"
        )

    def _item(self, rec: dict[str, Any], images: list, where: str) -> BenchItem:
        try:
            qtype = rec["question_type"]
            options = _parse_options(rec.get("options"), where)
            return BenchItem(
                id=str(rec["id"]), question=rec["question"], images=images, answers=_parse_answer(rec["answer"]),
                metadata={"question_type": qtype, "options": options, "subject": subject_of(str(rec["id"])),
                          "subfield": rec.get("subfield"), "img_type": rec.get("img_type")},
            )
        except KeyError as e:
            raise EvalInputError(f"{where}: missing field {e}") from None

    def _load_json(self, root: Path, path: Path) -> list[BenchItem]:
        rows = read_json_list(path, "questions")
        items = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise EvalInputError(f"{path}: row {i} is not an object")
            imgs = [root / r[f"image_{k}"] for k in range(1, 8) if r.get(f"image_{k}")]
            items.append(self._item(r, imgs, f"{path}: row {i}"))
        return checked_items(items, path)

    def _load_parquet(self, root: Path, files: list[Path]) -> list[BenchItem]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalInputError("reading MMMU parquet files needs pyarrow (pip install pyarrow)") from None
        items, sources = [], []
        for path in files:
            try:
                rows = pq.read_table(path).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise EvalInputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
            for i, r in enumerate(rows):
                imgs = []
                for k in range(1, 8):
                    cell = r.get(f"image_{k}")
                    if isinstance(cell, dict) and cell.get("bytes"):
                        imgs.append(cell["bytes"])
                    elif isinstance(cell, dict) and cell.get("path"):
                        imgs.append(path.parent / cell["path"])
                items.append(self._item(r, imgs, f"{path}: row {i}"))
                sources.append(path)
        return checked_items(items, sources)

    def _load_answer_dict(self, path: Path) -> list[BenchItem]:
        data = read_json(path)
        if not isinstance(data, dict):
            raise EvalInputError(f"{path}: expected an object id -> {{question_type, ground_truth}}")
        items = []
        for key, r in data.items():
            try:
                items.append(BenchItem(
                    id=key, question="", images=[], answers=_parse_answer(r["ground_truth"]),
                    metadata={"question_type": r["question_type"], "options": None, "subject": subject_of(key),
                              "answers_only": True},
                ))
            except (KeyError, TypeError) as e:
                raise EvalInputError(f"{path}: {key}: missing or malformed field {e}") from None
        return checked_items(items, path)

    # -- prompting ------------------------------------------------------------------------
    def prompt(self, item: BenchItem) -> str:
        if item.metadata.get("answers_only"):
            raise EvalInputError(f"item {item.id}: the MMMU answer dict has no questions; point --data at the question files")
        if item.metadata["question_type"] == "multiple-choice" and item.metadata["options"]:
            opts = "".join(f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(item.metadata["options"]))
            return f"{item.question}\n\n{opts}\n\nAnswer with the option's letter from the given choices directly."
        return f"{item.question}\n\nAnswer the question using a single word or phrase."

    # -- scoring --------------------------------------------------------------------------
    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        parser = MMMUParser(random_fallback=self.random_fallback)
        per_item: dict[str, float] = {}
        by_subject: dict[str, list[float]] = defaultdict(list)
        parsed: dict[str, Any] = {}
        for it in items:  # benchmark order: the random fallback's draws depend on it
            ok = False
            if it.id in predictions:
                resp = predictions[it.id]
                md = it.metadata
                if md["question_type"] == "multiple-choice":
                    if md["options"]:
                        letters = [chr(ord("A") + i) for i in range(len(md["options"]))]
                        index2ans = dict(zip(letters, md["options"]))
                    else:
                        letters, index2ans = list(FALLBACK_CHOICES), {}
                    pred = parser.parse_multi_choice_response(resp, letters, index2ans)
                    gold = it.answers if len(it.answers) > 1 else it.answers[0]
                    ok = mmmu_eval_multi_choice(gold, pred)
                else:
                    pred = parse_open_response(resp)
                    gold = it.answers if len(it.answers) > 1 else it.answers[0]
                    ok = mmmu_eval_open(gold, pred)
                parsed[it.id] = pred
            per_item[it.id] = float(ok)
            by_subject[it.metadata["subject"]].append(float(ok))
        breakdown: dict[str, float] = {}
        for domain, subjects in MMMU_DOMAINS.items():
            groups = [(sum(by_subject[s]) / len(by_subject[s]), len(by_subject[s])) for s in subjects if by_subject.get(s)]
            if groups:
                breakdown[domain] = instance_weighted_accuracy(groups)
        for s in sorted(by_subject):
            breakdown[s] = sum(by_subject[s]) / len(by_subject[s])
        overall = instance_weighted_accuracy((sum(v) / len(v), len(v)) for v in by_subject.values() if v)
        n = len(items)
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{overall:.3f}", breakdown=breakdown,
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"random_fallbacks": parser.random_fallbacks,
                   "answers_only": bool(items and items[0].metadata.get("answers_only"))},
            per_item=per_item,
            groups=group_ids(items, lambda it: [it.metadata["subject"], SUBJECT_TO_DOMAIN.get(it.metadata["subject"])]),
        )


BENCHMARKS.register("mmmu")(MMMU)
