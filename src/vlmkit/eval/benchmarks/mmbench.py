"""MMBench (Liu et al. 2024) with circular evaluation, scored as VLMEvalKit scores it without a judge.

Each question appears once per rotation of its options: row `g` and rows `g + k * 1,000,000`. A
question passes only if the answer matched from every rotation is the gold letter. VLMEvalKit's
exact-matching path (`mcq_circular_eval` with no judge model) settles a question from the matched
letters alone: one rotation matched to a wrong letter fails it; a rotation that matches no letter
also fails it, but there VLMEvalKit would have asked its LLM judge, so those questions are listed
as ones a judge could have changed.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlmkit.eval.choice_rules import vlmevalkit_can_infer, vlmevalkit_prediction_text
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, check_prediction_ids, checked_items

ROTATION = 1_000_000
TSV_NAMES = ("MMBench_DEV_EN.tsv", "MMBench_DEV_EN_V11.tsv", "MMBench_DEV_CN.tsv", "MMBench_DEV_CN_V11.tsv")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# VLMEvalKit's report names the L2 abilities by these abbreviations (multiple_choice.py MMB_abbrs).
L2_ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def find_tsv(data: Path) -> Path:
    if data.is_file():
        return data
    if not data.is_dir():
        raise EvalInputError(f"{data}: benchmark data folder not found")
    for name in TSV_NAMES:
        if (data / name).is_file():
            return data / name
    found = sorted(data.glob("MMBench*.tsv"))
    if len(found) == 1:
        return found[0]
    raise EvalInputError(f"{data}: no MMBench TSV found (looked for {', '.join(TSV_NAMES)}"
                         f"{'; several MMBench*.tsv: name one with --data' if found else ''})")


def read_tsv(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep="\t")
    except (ValueError, OSError, UnicodeDecodeError) as e:  # pandas' parser errors are ValueErrors
        raise EvalInputError(f"{path}: not a readable TSV ({type(e).__name__}: {e})") from None
    missing = [c for c in ("index", "question", "answer", "A", "B") if c not in frame.columns]
    if missing:
        raise EvalInputError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(map(str, frame.columns))}")
    return frame.to_dict("records")


class MMBench(Benchmark):
    name = "mmbench"
    metric = "circular accuracy: a question counts only if every rotation of its options is answered right"
    parser = ("VLMEvalKit can_infer under exact matching: the option letter (alone among the last four words, or "
              "'answer is X'), else the one option whose text appears; no match fails the question")
    prompt_template = ("[Hint: {hint}\\n]Question: {question}\\nOptions:\\nA. ...\\nB. ...\\n"
                       "Please select the correct answer from the options above. \\n")
    source = ("open-compass/VLMEvalKit vlmeval/dataset/utils/multiple_choice.py (mcq_circular_eval, report_acc) and "
              "vlmeval/utils/matching_util.py (can_infer), as of commit e8e78f0 (2026-08-18)")
    default_max_new_tokens = 32

    def cluster_key(self, item_id: str) -> str:
        try:
            return str(int(item_id) % ROTATION)
        except ValueError:
            return item_id

    def load(self, data_dir) -> list[BenchItem]:
        path = find_tsv(Path(data_dir))
        rows = read_tsv(path)
        raw_images = {str(r["index"]): r.get("image") for r in rows}
        items = []
        for n, r in enumerate(rows):
            where = f"{path}: row {n + 2} (index {r['index']!r})"
            try:
                index = int(r["index"])
            except (TypeError, ValueError):
                raise EvalInputError(f"{where}: index must be an integer") from None
            # Blank cells are no option, as pandas reads them for VLMEvalKit: that includes an option
            # written "None" or "NA", so a gold letter may name no shown option (it can never pass).
            options = {c: str(r[c]) for c in LETTERS if c in r and not _blank(r[c])}
            answer = str(r["answer"]).strip()
            if len(answer) != 1 or answer not in LETTERS or len(options) < 2:
                raise EvalInputError(f"{where}: answer {answer!r} is not an option letter, or the row has fewer "
                                     f"than two options ({''.join(options) or 'none'})")
            items.append(BenchItem(
                id=str(index), question=str(r["question"]), images=self._image(raw_images, r.get("image"), where),
                answers=[answer],
                metadata={"options": options, "hint": None if _blank(r.get("hint")) else str(r["hint"]),
                          "category": None if _blank(r.get("category")) else str(r["category"]),
                          "l2-category": None if _blank(r.get("l2-category")) else str(r["l2-category"])}))
        return checked_items(items, path)

    @staticmethod
    def _image(raw: dict[str, Any], cell: Any, where: str) -> list:
        if _blank(cell):
            return []
        text = str(cell)
        if len(text) <= 64:  # a rotation names the row whose image it shares, as VLMEvalKit reads it
            text = str(raw.get(text) or "")
            if len(text) <= 64:
                raise EvalInputError(f"{where}: image refers to index {str(cell)!r}, which has no image")
        try:
            return [base64.b64decode(text, validate=True)]
        except (binascii.Error, ValueError):
            raise EvalInputError(f"{where}: image is not base64") from None

    def prompt(self, item: BenchItem) -> str:
        md = item.metadata
        text = f"Hint: {md['hint']}\n" if md.get("hint") else ""
        text += f"Question: {item.question}\nOptions:\n"
        text += "".join(f"{k}. {v}\n" for k, v in md["options"].items())
        return text + "Please select the correct answer from the options above. \n"

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        rotations: dict[int, list[BenchItem]] = defaultdict(list)
        for it in sorted(items, key=lambda it: int(it.id)):
            rotations[int(it.id) % ROTATION].append(it)
        per_item: dict[str, float] = {}
        groups: dict[str, list[str]] = defaultdict(list)
        judge, unmatched, headless = [], 0, 0
        for g, rows in rotations.items():
            if int(rows[0].id) != g:  # VLMEvalKit scores a question from its first row only
                headless += 1
                continue
            hit, n_unmatched, settled = self._question(rows, predictions)
            unmatched += n_unmatched
            if not settled:
                judge.append(rows[0].id)
            per_item[rows[0].id] = float(hit)
            md = rows[0].metadata
            if md.get("l2-category"):
                groups[L2_ABBREVIATIONS.get(md["l2-category"], md["l2-category"])].append(rows[0].id)
            if md.get("category"):
                groups[md["category"]].append(rows[0].id)
        n_q = len(per_item)
        overall = sum(per_item.values()) / n_q if n_q else 0.0
        breakdown = {k: sum(per_item[i] for i in groups[k]) / len(groups[k]) for k in sorted(groups)}
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{100 * overall:.2f}", breakdown=breakdown,
            metric=self.metric, parser=self.parser, n_items=len(items), n_predicted=n_pred,
            n_missing=len(items) - n_pred,
            extra={"questions": n_q, "rotations": len(items), "unmatched_rotations": unmatched,
                   "judge_could_change": len(judge), "judge_could_change_ids": judge,
                   "questions_without_first_row": headless},
            per_item=per_item, groups={k: groups[k] for k in sorted(groups)},
        )

    @staticmethod
    def _question(rows: list[BenchItem], predictions: dict[str, str]) -> tuple[bool, int, bool]:
        """(passes, rotations no letter was matched from, whether the rules settled it: False
        when it fails only for unmatched rotations, which VLMEvalKit's judge would have read)."""
        unmatched = 0
        for it in rows:  # in index order, stopping at the first wrong letter as VLMEvalKit does
            if it.id not in predictions:
                return False, unmatched, True
            letter = vlmevalkit_can_infer(vlmevalkit_prediction_text(predictions[it.id]), it.metadata["options"])
            if letter is None:
                unmatched += 1
            elif letter != it.answers[0]:
                return False, unmatched, True
        return unmatched == 0, unmatched, unmatched == 0


BENCHMARKS.register("mmbench")(MMBench)
