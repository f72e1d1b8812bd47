"""AI2D (Kembhavi et al. 2016): multiple-choice questions on grade-school science diagrams, the
test split of the AI2 release (the image ids in ``ai2d_test_ids.csv``).

Scored by lmms-eval's rule (task ``ai2d``): a response that starts with a capital letter and a
full stop ("B. the red one") is reduced to that letter, otherwise kept whole; it is right when,
lower-cased and with ASCII punctuation removed, it equals the gold letter ("(C)" and "c" are
right, "The answer is D" and the option's text are not). The AI2D paper ships no generative
scoring script; VLMEvalKit's rule (option matching, then an LLM judge) gives other numbers.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from vlmkit.registry import BENCHMARKS

from .base import (
    BenchItem,
    Benchmark,
    EvalInputError,
    ScoreResult,
    check_prediction_ids,
    checked_items,
    group_ids,
    mean,
    read_json,
    require_dir,
)

TEST_IDS = "ai2d_test_ids.csv"
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCT = str.maketrans("", "", string.punctuation)
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def ai2d_correct(response: str, letter: str) -> bool:
    """lmms-eval's ``MultiChoiceRegexFilter`` then ``exact_match`` (ignore_case, ignore_punctuation)."""
    m = _LEADING_LETTER.match(response)
    pred = m.group(1) if m else response
    return pred.lower().translate(_PUNCT) == letter.lower().translate(_PUNCT)


def _test_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot be read ({e})") from None
    ids = [ln.strip().split(",")[0].strip() for ln in lines if ln.strip()]
    ids = [i.removesuffix(".png") for i in ids]
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise EvalInputError(f"{path}: {bad[0]!r} is not an AI2D image id (one number per line, e.g. 4400)")
    return ids


class AI2D(Benchmark):
    name = "ai2d"
    metric = "accuracy, lmms-eval's ai2d rule: leading 'X.' letter filter, then exact match ignoring case and punctuation"
    parser = "lmms-eval MultiChoiceRegexFilter ('^\\s*([A-Z])\\.' -> letter, else the whole response)"
    prompt_template = "{question}\\nA. opt\\nB. opt\\n...\\nAnswer with the option's letter from the given choices directly."
    default_max_new_tokens = 16

    def _find(self, root: Path) -> tuple[Path, Path]:
        ai2d = root / "ai2d" if (root / "ai2d" / "questions").is_dir() else root
        if not (ai2d / "questions").is_dir():
            raise EvalInputError(f"{root}: no AI2D release found (expected ai2d/questions/, ai2d/images/ and {TEST_IDS})")
        for cand in (root / TEST_IDS, ai2d / TEST_IDS, ai2d.parent / TEST_IDS):
            if cand.is_file():
                return ai2d, cand
        raise EvalInputError(f"{root}: {TEST_IDS} not found (it defines the test split; AI2 publishes it beside the release)")

    def load(self, data_dir) -> list[BenchItem]:
        ai2d, ids_path = self._find(require_dir(data_dir))
        cats_path = ai2d / "categories.json"
        categories = read_json(cats_path) if cats_path.is_file() else {}
        items, sources = [], []
        for image_id in sorted(set(_test_ids(ids_path)), key=int):
            path = ai2d / "questions" / f"{image_id}.png.json"
            if not path.is_file():
                raise EvalInputError(f"{path}: question file of test image {image_id} ({ids_path.name}) not found")
            doc = read_json(path)
            try:
                image_name = doc["imageName"]
                for question, q in doc["questions"].items():
                    options = [str(o) for o in q["answerTexts"]]
                    k = int(q["correctAnswer"])
                    if not 0 <= k < len(options):
                        raise EvalInputError(f"{path}: question {q['questionId']}: correctAnswer {k} is not an option index")
                    items.append(BenchItem(
                        id=str(q["questionId"]), question=question, images=[ai2d / "images" / image_name],
                        answers=[chr(ord("A") + k)],
                        metadata={"options": options, "abcLabel": bool(q.get("abcLabel")), "image": image_name,
                                  "category": categories.get(image_name, "unknown")}))
                    sources.append(path)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise EvalInputError(f"{path}: missing or malformed field {e}") from None
        return checked_items(items, sources)

    def prompt(self, item: BenchItem) -> str:
        opts = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(item.metadata["options"]))
        return f"{item.question}\n{opts}\n{POST_PROMPT}"

    def cluster_key(self, item_id: str) -> str:
        """The diagram: question ids are ``<image>.png-<n>``."""
        return item_id.rpartition("-")[0] or item_id

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item = {it.id: float(ai2d_correct(predictions[it.id], it.answers[0])) if it.id in predictions else 0.0
                    for it in items}
        groups = group_ids(items, lambda it: [f"category={it.metadata['category']}",
                                              f"abcLabel={str(it.metadata['abcLabel']).lower()}"])
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{100 * overall:.2f}",
            breakdown={k: mean(per_item[i] for i in ids) for k, ids in groups.items()}, metric=self.metric,
            parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"correct": int(sum(per_item.values()))}, per_item=per_item, groups=groups,
        )


BENCHMARKS.register("ai2d")(AI2D)
