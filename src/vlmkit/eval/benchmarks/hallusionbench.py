"""HallusionBench (Guan et al. 2024): yes/no questions on figures, some edited to contradict
common knowledge, in two categories, VD (visual dependent) and VS (visual supplement; some of
its questions are asked without the figure). Scored as the repository's ``evaluation.py``:

- aAcc: accuracy per question;
- fAcc: per figure (``category_subcategory_set_figure``), right only if all of its questions
  are; VS questions asked without a figure (figure_id 0) are left out;
- qAcc: per question (``category_subcategory_set_question``), right only if it is right on
  every figure it is asked about;

each overall, for VD and for VS. The official tool asks GPT-4 whether each response agrees
with the reference; without a judge the response's yes/no is read with VLMEvalKit's
``YOrN_Extraction`` (the words of the lower-cased response after VQA punctuation handling:
"yes" without "no" is Yes, "no" without "yes" is No, anything else Unknown). An Unknown is
what the judge settles: those items are listed as judge-dependent. As the official tool counts
an "unclear" answer right on a VS question asked without its figure, an Unknown counts right
there too.
"""

from __future__ import annotations

from collections import defaultdict

from vlmkit.eval.metrics import vqa_process_punctuation
from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    find_first,
    read_json_list,
    require_dir,
)

IMAGE_ROOTS = (".", "hallusion_bench")


def yorn(response: str) -> str:
    """"Yes", "No" or "Unknown" by VLMEvalKit's ``YOrN_Extraction``."""
    words = vqa_process_punctuation(response.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def _all_right(groups: dict[str, list[bool]]) -> float:
    return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0


def hallusion_figures(rows: list[tuple[dict, bool]]) -> dict[str, float]:
    """aAcc, fAcc and qAcc of (item metadata, right?) pairs, as ``evaluation.py`` defines them."""
    figures: dict[str, list[bool]] = defaultdict(list)
    questions: dict[str, list[bool]] = defaultdict(list)
    for md, ok in rows:
        base = f"{md['category']}_{md['subcategory']}_{md['set_id']}"
        if not (md["category"] == "VS" and md["figure_id"] == "0"):
            figures[f"{base}_{md['figure_id']}"].append(ok)
        questions[f"{base}_{md['question_id']}"].append(ok)
    return {"aAcc": sum(ok for _, ok in rows) / len(rows) if rows else 0.0, "fAcc": _all_right(figures),
            "qAcc": _all_right(questions)}


class HallusionBench(Benchmark):
    name = "hallusionbench"
    metric = ("aAcc (per question), fAcc (per figure), qAcc (per question across figures); overall, VD, VS "
              "(tianyi-lab/HallusionBench evaluation.py)")
    parser = ("VLMEvalKit YOrN_Extraction in place of the official GPT-4 check; Unknown answers are judge-dependent "
              "(right on VS questions without a figure, wrong elsewhere)")
    prompt_template = "{question}\\nPlease answer yes or no."
    default_max_new_tokens = 32

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        path = find_first(root, ["HallusionBench.json"], "HallusionBench.json")
        rows = read_json_list(path, "questions")
        image_root = next((root / d for d in IMAGE_ROOTS if (root / d / "VD").is_dir() or (root / d / "VS").is_dir()), root)
        items = []
        for i, r in enumerate(rows):
            try:
                md = {k: str(r[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id", "visual_input")}
                gt = str(r["gt_answer"])
                if gt not in ("0", "1"):
                    raise EvalInputError(f"{path}: row {i}: gt_answer {r['gt_answer']!r} is neither '0' (no) nor '1' (yes)")
                images = [image_root / r["filename"]] if r.get("filename") and md["visual_input"] != "0" else []
                item_id = "_".join(md[k] for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
                items.append(BenchItem(id=item_id, question=r["question"], images=images,
                                       answers=["Yes" if gt == "1" else "No"],
                                       metadata={**md, "gt_answer_details": r.get("gt_answer_details")}))
            except (KeyError, TypeError) as e:
                raise EvalInputError(f"{path}: row {i}: missing or malformed field {e}") from None
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return f"{item.question}\nPlease answer yes or no."

    def cluster_key(self, item_id: str) -> str:
        """The question set (``category_subcategory_set``): fAcc groups its figures and qAcc its
        questions, so both groupings stay within one set."""
        return "_".join(item_id.split("_")[:3])

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item: dict[str, float] = {}
        rows: list[tuple[dict, bool]] = []
        judge_dependent: list[str] = []
        for it in items:
            md = it.metadata
            ok = False
            if it.id in predictions:
                answer = yorn(predictions[it.id])
                if answer == "Unknown":
                    judge_dependent.append(it.id)
                    ok = md["category"] == "VS" and md["figure_id"] == "0"
                else:
                    ok = answer == it.answers[0]
            per_item[it.id] = float(ok)
            rows.append((md, ok))
        breakdown: dict[str, float] = {}
        parts = {"Overall": rows, "VD": [r for r in rows if r[0]["category"] == "VD"],
                 "VS": [r for r in rows if r[0]["category"] == "VS"]}
        for sub in sorted({f"{md['category']}_{md['subcategory']}" for md, _ in rows}):
            parts[sub] = [r for r in rows if f"{r[0]['category']}_{r[0]['subcategory']}" == sub]
        for part, sub_rows in parts.items():
            if sub_rows:
                for k, v in hallusion_figures(sub_rows).items():
                    breakdown[f"{part}/{k}"] = v
        n = len(items)
        n_pred = sum(1 for it in items if it.id in predictions)
        b = breakdown
        return ScoreResult(
            benchmark=self.name, overall=b.get("Overall/aAcc", 0.0),
            display=(f"qAcc {100 * b.get('Overall/qAcc', 0.0):.2f}, fAcc {100 * b.get('Overall/fAcc', 0.0):.2f}, "
                     f"aAcc {100 * b.get('Overall/aAcc', 0.0):.2f}"),
            breakdown=breakdown, metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred,
            n_missing=n - n_pred,
            extra={"judge_dependent": len(judge_dependent), "judge_dependent_ids": judge_dependent},
            per_item=per_item,
        )


BENCHMARKS.register("hallusionbench")(HallusionBench)
