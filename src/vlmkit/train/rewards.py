"""Rewards for `loss: grpo`, by name: each scores a batch of completions against their references.

Every scorer an answer can be checked by is a reward (`exact`, `contains`, `vqa`, `relaxed`,
`anls`, `mmmu-choice`, `mathvista`), with the benchmarks' own rules; `format` checks the
completion against a regular expression. A recipe names one, or a weighted sum of several; a name
of the form `file.py:function` or `module:function` is the user's own function (trusted code).

A reward function takes keyword arguments `completions`, `references` and `prompts` (lists of
strings, one per completion) and returns one number per completion, as TRL's reward functions
take `completions` and the dataset's columns.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.eval.benchmarks.custom import METRICS
from vlmkit.eval.metrics import (
    MMMUParser,
    mathvista_normalize,
    mathvista_rule_extract,
    mmmu_eval_multi_choice,
    vqa_accuracy,
)

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """An unknown reward, a reward that cannot be loaded, or one that returns what is not a number."""


def _per_answer(score: Callable[[str, str], float]) -> RewardFn:
    def reward(completions, references, **_):
        return [float(score(c, r)) for c, r in zip(completions, references)]

    return reward


def _vqa(completions, references, **_):
    # One reference given ten times: VQA's normalisation and matching, full credit on a match.
    return [vqa_accuracy(c, [r] * 10, always_normalize=True) for c, r in zip(completions, references)]


_LETTERS = re.compile(r"^\(?([A-Z])[.):]\s")


def _mmmu_choice(completions, references, prompts=None, **_):
    """MMMU's multiple-choice parser (no random fallback: a reward must be deterministic) over
    the options the prompt lists as lines `A. ...` / `(A) ...`, or A-D when it lists none."""
    parser = MMMUParser(random_fallback=False)
    out = []
    for i, (c, r) in enumerate(zip(completions, references)):
        prompt = prompts[i] if prompts else ""
        options = {}
        for line in prompt.splitlines():
            m = _LETTERS.match(line.strip() + " ")
            if m:
                options[m.group(1)] = line.strip()[m.end() - 1:].strip()
        letters = sorted(options) or ["A", "B", "C", "D"]
        gold = r.strip().strip("()").strip(".")[:1].upper()
        out.append(float(mmmu_eval_multi_choice(gold, parser.parse_multi_choice_response(c, letters, options))))
    return out


def _answer_type(reference: str) -> tuple[str, int | None]:
    try:
        int(reference)
        return "integer", None
    except ValueError:
        pass
    try:
        float(reference)
        return "float", len(reference.split(".")[1]) if "." in reference else 0
    except ValueError:
        return "text", None


def _mathvista(completions, references, **_):
    """MathVista's rule extraction and normalisation of a free-form answer, its type (integer,
    float with the reference's decimals, or text) told from the reference."""
    out = []
    for c, r in zip(completions, references):
        kind, precision = _answer_type(r.strip())
        got = mathvista_normalize(mathvista_rule_extract(c, "free_form", kind, None), None, "free_form", kind, precision)
        want = mathvista_normalize(r.strip(), None, "free_form", kind, precision)
        out.append(float(got is not None and got == want))
    return out


def format_reward(pattern: str) -> RewardFn:
    """1 where the whole completion matches `pattern` (dot matches newlines), else 0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions, **_):
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return reward


# name -> reward function (`format` is built from the stage's pattern).
REWARDS: dict[str, RewardFn] = {
    **{name: _per_answer(score) for name, (score, _) in METRICS.items()},
    "vqa": _vqa,
    "mmmu-choice": _mmmu_choice,
    "mathvista": _mathvista,
}


def _user_function(spec: str) -> RewardFn:
    """`path/to/file.py:function` or `module:function`: the user's own code, imported as is."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RewardError(f"reward {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"vlmkit_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import
        raise RewardError(f"reward {spec!r}: cannot load {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


@dataclass
class Reward:
    """A weighted sum of named reward terms."""

    terms: dict[str, tuple[RewardFn, float]]

    def __call__(self, completions: list[str], references: list[str], prompts: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, each term's unweighted rewards)."""
        per_term = {name: self._checked(name, fn(completions=completions, references=references, prompts=prompts), len(completions))
                    for name, (fn, _) in self.terms.items()}
        totals = [sum(w * per_term[name][i] for name, (_, w) in self.terms.items()) for i in range(len(completions))]
        return totals, per_term

    @staticmethod
    def _checked(name: str, values, n: int) -> list[float]:
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {name!r} returned {type(values).__name__}, not a list of {n} numbers") from None
        if len(values) != n:
            raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise RewardError(f"reward {name!r} returned {v!r} ({type(v).__name__}) for completion {i}; a reward must be a finite number")
        return [float(v) for v in values]


def build_reward(spec: str | dict[str, float], format_pattern: str) -> Reward:
    """The reward a stage's `grpo.reward` names; an unknown name is refused with the known ones."""
    weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not weights:
        raise RewardError("grpo.reward names no reward")
    terms = {}
    for name, weight in weights.items():
        if name == "format":
            fn = format_reward(format_pattern)
        elif name in REWARDS:
            fn = REWARDS[name]
        elif ":" in name:
            fn = _user_function(name)
        else:
            raise RewardError(f"unknown reward {name!r}; rewards: {', '.join(sorted([*REWARDS, 'format']))}, "
                              "or your own as file.py:function")
        terms[name] = (fn, float(weight))
    return Reward(terms)
