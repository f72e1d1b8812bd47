"""MMMU-Pro (Yue et al. 2024): MMMU questions with ten options (`standard`) or photographed with
their options into one image (`vision`), scored with MMMU-Pro's own `evaluate.py` parser.

The official parser answers an unreadable response with `random.choice` of the letters, unseeded.
vlmkit seeds that draw (`?seed=`, default 42, items in benchmark order) and reports the range the
draws could give: every drawn letter wrong up to every drawn letter right.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from vlmkit.eval.choice_rules import MMMU_PRO_SEED, MMMUProParser
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, check_prediction_ids, checked_items
from .mmmu import _parse_options
from .mmstar import image_cell, read_parquet_rows

PROMPTS = {  # mmmu-pro/prompts.yaml, the `direct` setting
    "standard": "Answer with the option letter from the given choices directly.",
    "vision": ("Answer with the option letter from the given choices directly. The last line of your response should "
               "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of options."),
}


class _MMMUPro(Benchmark):
    setting: ClassVar[str]
    folder: ClassVar[str]  # the folder of the Hugging Face release (MMMU/MMMU_Pro)
    columns: ClassVar[tuple[str, ...]] = ()  # the setting's own columns, besides id, options, answer
    metric = "accuracy (MMMU-Pro evaluate.py: parsed letter == answer), per subject"
    parser = ("MMMU-Pro parse_multi_choice_response: the last 'Answer:' line if it names one letter, else (X), "
              "'X ', 'X.', option text (responses over 5 words), else a seeded random letter")
    source = "MMMU-Benchmark/MMMU mmmu-pro/evaluate.py (mmmu_process_results, parse_multi_choice_response)"
    default_max_new_tokens = 128

    def __init__(self, seed: int | str = MMMU_PRO_SEED, random_fallback: bool | str = True):
        try:
            self.seed = int(seed)
        except ValueError:
            raise EvalInputError(f"{self.name}: seed must be an integer, got {seed!r}") from None
        self.random_fallback = str(random_fallback).lower() not in ("0", "false", "no")

    def load(self, data_dir) -> list[BenchItem]:
        root = Path(data_dir)
        if not root.is_dir():
            raise EvalInputError(f"{root}: benchmark data folder not found")
        folder = root / self.folder if (root / self.folder).is_dir() else root
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise EvalInputError(f"{root}: no MMMU-Pro parquet files (looked in '{self.folder}/' and the folder itself)")
        items, sources = [], []
        for path in files:
            for n, r in enumerate(read_parquet_rows(path, ("id", "options", "answer", *self.columns))):
                where = f"{path}: row {n} (id {r.get('id')!r})"
                options = _parse_options(r["options"], where)
                if not options or str(r["answer"]) not in [chr(ord("A") + i) for i in range(len(options))]:
                    raise EvalInputError(f"{where}: answer {r['answer']!r} does not name one of its {len(options)} options")
                items.append(BenchItem(id=str(r["id"]), question=str(r.get("question") or ""),
                                       images=self._images(r, path, where), answers=[str(r["answer"])],
                                       metadata={"options": options, "subject": str(r.get("subject") or "")}))
                sources.append(path)
        return checked_items(items, sources)

    def _images(self, row, path: Path, where: str) -> list:
        raise NotImplementedError

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        parser = MMMUProParser(seed=self.seed, random_fallback=self.random_fallback)
        per_item: dict[str, float] = {}
        groups: dict[str, list[str]] = defaultdict(list)
        drawn_right = 0
        for it in items:  # benchmark order: the fallback's draws depend on it
            ok = False
            if it.id in predictions:
                letters = [chr(ord("A") + i) for i in range(len(it.metadata["options"]))]
                letter, drawn = parser.parse(predictions[it.id], letters, dict(zip(letters, it.metadata["options"])))
                ok = letter == it.answers[0]
                drawn_right += ok and drawn
            per_item[it.id] = float(ok)
            groups[it.metadata["subject"]].append(it.id)
        n = len(items)
        right = sum(per_item.values())
        overall = right / n if n else 0.0
        low = (right - drawn_right) / n if n else 0.0
        high = (right - drawn_right + parser.random_fallbacks) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{100 * overall:.2f}%",
            breakdown={k: sum(per_item[i] for i in v) / len(v) for k, v in sorted(groups.items())},
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"correct": int(right), "random_fallbacks": parser.random_fallbacks,
                   "random_fallbacks_right": int(drawn_right), "random_seed": self.seed,
                   "random_fallback_range": [low, high]},
            per_item=per_item, groups={k: groups[k] for k in sorted(groups)},
        )


class MMMUProStandard(_MMMUPro):
    name = "mmmu-pro-standard"
    setting = "standard"
    folder = "standard (10 options)"
    columns = ("question",)
    prompt_template = "{question}\\nA. opt\\nB. opt\\n...\\n" + PROMPTS["standard"]

    def _images(self, row, path, where):
        return [img for k in range(1, 8) for img in image_cell(row.get(f"image_{k}"), path.parent, where)]

    def prompt(self, item: BenchItem) -> str:
        opts = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(item.metadata["options"]))
        return f"{item.question}\n{opts}\n{PROMPTS['standard']}"


class MMMUProVision(_MMMUPro):
    name = "mmmu-pro-vision"
    setting = "vision"
    folder = "vision"
    columns = ("image",)
    prompt_template = PROMPTS["vision"]

    def _images(self, row, path, where):
        return image_cell(row["image"], path.parent, where)

    def prompt(self, item: BenchItem) -> str:
        return PROMPTS["vision"]


BENCHMARKS.register("mmmu-pro-standard")(MMMUProStandard)
BENCHMARKS.register("mmmu-pro-vision")(MMMUProVision)
