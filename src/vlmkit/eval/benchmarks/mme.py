"""MME (Fu et al. 2023): yes/no questions in 14 subtasks, two per image (one answered yes, one
no), scored by the release's ``eval_tool/calculation.py``.

Per subtask: acc over questions, acc+ over images (both questions right), score =
100 * (acc + acc+); the perception and cognition totals are sums of their subtasks' scores
(2000 and 800 at most). The official answer rule lower-cases the response; exactly "yes"/"no"
is that answer, otherwise "yes" within its first four characters means yes, then "no" means no
("not sure" is a no), and anything else is "other", which counts as wrong.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, check_prediction_ids, checked_items, group_ids, require_dir

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
RELEASE_DIR = "MME_Benchmark_release_version"
IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def mme_answer(response: str) -> str:
    """"yes", "no" or "other" by ``calculation.py``'s ``parse_pred_ans``."""
    pred = response.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _read_pair(path: Path) -> list[tuple[str, str]]:
    """The two (question, "yes"/"no") lines of one image's question file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot be read ({e})") from None
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
            raise EvalInputError(f"{path}:{lineno}: expected 'question<TAB>Yes' or 'question<TAB>No'")
        pairs.append((question, answer.strip().lower()))
    if len(pairs) != 2:
        raise EvalInputError(f"{path}: {len(pairs)} question line(s); MME asks two questions per image")
    return pairs


def _image_beside(folder: Path, stem: str, txt: Path) -> Path:
    for ext in IMAGE_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise EvalInputError(f"{txt}: no image {stem}.jpg or {stem}.png in {folder}")


class MME(Benchmark):
    name = "mme"
    metric = ("per subtask acc, acc+ (both questions of an image right), score = 100*(acc + acc+); perception and "
              "cognition totals (BradyFU MME eval_tool/calculation.py)")
    parser = "MME calculation.py parse_pred_ans: lower-cased; 'yes'/'no', else 'yes' then 'no' in the first 4 characters, else other"
    prompt_template = "{question}  (the release's question, ending 'Please answer yes or no.')"
    default_max_new_tokens = 16

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        if (root / RELEASE_DIR).is_dir():
            root = root / RELEASE_DIR
        items, sources = [], []
        for subtask in PERCEPTION + COGNITION:
            folder = root / subtask
            if not folder.is_dir():
                continue
            qa_dir = folder / "questions_answers_YN"
            nested = qa_dir.is_dir()
            txts = sorted((qa_dir if nested else folder).glob("*.txt"))
            for txt in txts:
                image = _image_beside(folder / "images" if nested else folder, txt.stem, txt)
                for line, (question, answer) in enumerate(_read_pair(txt)):
                    items.append(BenchItem(
                        id=f"{subtask}/{image.name}#{line}", question=question, images=[image],
                        answers=["Yes" if answer == "yes" else "No"],
                        metadata={"subtask": subtask, "image": image.name}))
                    sources.append(txt)
        if not items:
            raise EvalInputError(f"{root}: no MME subtask folders found (expected {RELEASE_DIR}/<subtask>/ with "
                                 f"one of {', '.join(PERCEPTION + COGNITION)})")
        return checked_items(items, sources)

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def cluster_key(self, item_id: str) -> str:
        """The image: its two questions are scored together by acc+."""
        return item_id.rpartition("#")[0] or item_id

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item: dict[str, float] = {}
        # subtask -> image -> [right?]
        groups: dict[str, dict[str, list[bool]]] = {}
        other = 0
        for it in items:
            answer = mme_answer(predictions[it.id]) if it.id in predictions else "other"
            other += answer == "other"
            ok = answer == it.answers[0].lower()
            per_item[it.id] = float(ok)
            groups.setdefault(it.metadata["subtask"], {}).setdefault(it.metadata["image"], []).append(ok)
        breakdown: dict[str, float] = {}
        scores: dict[str, float] = {}
        for subtask in PERCEPTION + COGNITION:
            if subtask not in groups:
                continue
            images = groups[subtask].values()
            acc = sum(sum(v) for v in images) / sum(len(v) for v in images)
            acc_plus = sum(all(v) for v in images) / len(images)
            breakdown[f"{subtask}/acc"], breakdown[f"{subtask}/acc+"] = acc, acc_plus
            scores[subtask] = 100 * acc + 100 * acc_plus
        perception = sum(scores.get(s, 0.0) for s in PERCEPTION)
        cognition = sum(scores.get(s, 0.0) for s in COGNITION)
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"perception {perception:.2f}, cognition {cognition:.2f}",
            breakdown=breakdown, metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred,
            n_missing=n - n_pred,
            extra={"perception": perception, "cognition": cognition, "other_answers": other,
                   "all_subtasks": len(scores) == len(PERCEPTION + COGNITION), "subtask_scores": scores},
            per_item=per_item,
            # acc is the mean of a subtask's items (acc+ is per image, not an item mean).
            groups=group_ids(items, lambda it: [f"{it.metadata['subtask']}/acc"]),
        )


BENCHMARKS.register("mme")(MME)
