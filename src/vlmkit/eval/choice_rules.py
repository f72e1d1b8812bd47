"""Rule-based multiple-choice answer matching, as the official scorers do it without an LLM judge.

- VLMEvalKit (`vlmeval/utils/matching_util.py`, `can_infer`): the option-letter rule, then the
  option-text rule; what MMBench's circular evaluation uses under `exact_matching`.
- MMStar (`MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py`): the first letter of the
  response, or the letter after "(", "option " or "the answer is ".
- MMMU-Pro (`MMMU-Benchmark/MMMU mmmu-pro/evaluate.py`, `parse_multi_choice_response`): the last
  "Answer:" line, then MMMU's bracket / letter / option-text search, then a random letter.

Each is re-implemented rule for rule, quirks included (see docs/evaluation.md).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# VLMEvalKit's can_infer
# ---------------------------------------------------------------------------------------------

VLMEVALKIT_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VLMEVALKIT_SPLIT_CHARS = ".()[],:;!*#{}"
# The fallback for verbose answers ("The correct answer is **B**."); the (?i) also makes the
# letter class match lower case, as in VLMEvalKit.
_VLMEVALKIT_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def vlmevalkit_can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter a response names, 'Z' for a refusal, or None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in VLMEVALKIT_REFUSALS):
        return "Z"
    mod = answer
    for c in _VLMEVALKIT_SPLIT_CHARS:
        mod = mod.replace(c, " ")
    splits = mod.split()
    present = [c for c in choices if c in splits]
    if len(present) == 1:
        # Only a letter among the last four words counts (a leading "A" is often an article).
        if splits.index(present[0]) > len(splits) - 5:
            return present[0]
    elif not present and "Z" in splits:
        return "Z"
    m = _VLMEVALKIT_VERBOSE.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def vlmevalkit_can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text appears in a short response, or None."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def vlmevalkit_can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's `can_infer`: the option rule, then the text rule; None when neither settles it
    (where VLMEvalKit would ask its judge, or score the item wrong under exact matching)."""
    answer = str(answer)
    return vlmevalkit_can_infer_option(answer, choices) or vlmevalkit_can_infer_text(answer, choices)


def vlmevalkit_prediction_text(prediction: str) -> str:
    """VLMEvalKit reads predictions back from a spreadsheet, where an empty cell is NaN and then
    `str(nan)`: an empty response is matched as the text "nan"."""
    return "nan" if prediction == "" else prediction


# ---------------------------------------------------------------------------------------------
# MMStar
# ---------------------------------------------------------------------------------------------


def mmstar_correct(prediction: str, answer: str) -> bool:
    """MMStar's official rule on the lower-cased, stripped response (an empty one is wrong)."""
    gold = str(answer).lower().strip().replace("\n", " ")
    pred = str(prediction).lower().strip().replace("\n", " ")
    for prefix in ("", "(", "option ", "the answer is "):
        if pred.startswith(prefix) and len(pred) > len(prefix) and pred[len(prefix)] == gold:
            return True
    return False  # includes an empty response: the official pred[0] raises, caught as wrong


# ---------------------------------------------------------------------------------------------
# MMMU-Pro
# ---------------------------------------------------------------------------------------------

MMMU_PRO_SEED = 42  # evaluate.py seeds nothing; vlmkit seeds the draw and reports the range


@dataclass
class MMMUProParser:
    """MMMU-Pro's `parse_multi_choice_response`. The official script draws its fallback from an
    unseeded `random`; here one parser owns a seeded RNG (items fed in benchmark order), counts the
    draws, and whether each draw happened to be right is left to the caller."""

    seed: int = MMMU_PRO_SEED
    random_fallback: bool = True
    random_fallbacks: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def parse(self, response: str, all_choices: Sequence[str], index2ans: Mapping[str, str]) -> tuple[str, bool]:
        """(letter, whether it was drawn at random)."""
        last = response.rfind("Answer:")
        if last != -1:
            tail = response[last + len("Answer:"):].strip()
            found = [c for c in all_choices if c in tail]  # substring test, as in the original
            if len(found) == 1:
                return found[0], False
        for char in (",", ".", "!", "?", ";", ":", "'"):
            response = response.strip(char)
        response = f" {response} "
        by_letter, bracketed = True, False
        cands = [c for c in all_choices if f"({c})" in response]
        bracketed = bool(cands)
        if not cands:
            cands = [c for c in all_choices if f"{c} " in response]  # no leading space: "I " in "I think"
        if not cands:
            cands = [c for c in all_choices if f"{c}." in response]
        if not cands and len(response.split()) > 5:
            cands = [k for k, v in index2ans.items() if v.lower() in response.lower()]
            by_letter = False
        if not cands:
            self.random_fallbacks += 1
            return (self._rng.choice(list(all_choices)) if self.random_fallback else ""), True
        if len(cands) == 1:
            return cands[0], False
        if by_letter:
            pattern = "({})" if bracketed else " {} "
            starts = [response.rfind(pattern.format(c)) for c in cands]
        else:
            starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
        return cands[starts.index(max(starts))], False  # np.argmax: the first maximum
