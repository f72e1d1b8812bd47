"""AI2D: the AI2 release layout, the test split from ai2d_test_ids.csv, lmms-eval's prompt and rule."""

import json

import pytest

from vlmkit.eval.benchmarks import EvalInputError, get_benchmark, read_predictions
from vlmkit.eval.benchmarks.ai2d import ai2d_correct
from vlmkit.eval.contamination import contamination_report
from vlmkit.eval.synth import GOLD_NAME, synth_bench


@pytest.mark.parametrize("response, letter, right", [
    ("B", "B", True), ("B. the red one", "B", True), ("(C)", "C", True), ("c", "C", True), ("C!", "C", True),
    ("B.", "B", True), ("The answer is D", "D", False), ("", "A", False), ("ears", "A", False),
    ("B) red", "B", False), ("b. red", "B", False),  # the letter filter wants a capital and a full stop
])
def test_ai2d_lmms_eval_rule(response, letter, right):
    assert ai2d_correct(response, letter) is right


@pytest.fixture
def ai2d_dir(tmp_path):
    synth_bench("ai2d", tmp_path / "ai2d-release", n=6)
    return tmp_path / "ai2d-release"


def test_ai2d_layout_test_split_and_prompt(ai2d_dir):
    b = get_benchmark("ai2d")
    items = b.load(ai2d_dir)
    test_ids = (ai2d_dir / "ai2d_test_ids.csv").read_text().split()
    assert test_ids == ["0", "1", "2"] and (ai2d_dir / "ai2d" / "questions" / "3.png.json").is_file()
    assert [it.id for it in items] == ["0.png-0", "0.png-1", "1.png-0", "1.png-1", "2.png-0", "2.png-1"]
    doc = json.loads((ai2d_dir / "ai2d" / "questions" / "0.png.json").read_text())
    q, rec = next(iter(doc["questions"].items()))
    opts = rec["answerTexts"]
    assert b.prompt(items[0]) == (f"{q}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nD. {opts[3]}\n"
                                  "Answer with the option's letter from the given choices directly.")
    assert items[0].answers == [chr(ord("A") + rec["correctAnswer"])] and items[0].metadata["category"] == "partsOfA"
    assert b.cluster_key("0.png-1") == b.cluster_key("0.png-0") == "0.png" != b.cluster_key("1.png-0")


def test_ai2d_score_by_hand(ai2d_dir):
    b = get_benchmark("ai2d")
    items = b.load(ai2d_dir)
    gold = read_predictions(ai2d_dir / GOLD_NAME)
    it0, it1 = items[0], items[1]
    preds = dict(gold)
    preds[it0.id] = f"({gold[it0.id]})"  # right
    preds[it1.id] = f"The answer is {gold[it1.id]}"  # wrong under lmms-eval's rule
    del preds[items[2].id]  # missing: wrong
    r = b.score(items, preds)
    assert r.overall == pytest.approx(4 / 6) and r.extra["correct"] == 4 and r.n_missing == 1
    assert r.breakdown["abcLabel=true"] == pytest.approx(2 / 3)  # it1 is the image's second question: abcLabel


def test_ai2d_needs_the_test_ids(ai2d_dir):
    (ai2d_dir / "ai2d_test_ids.csv").unlink()
    with pytest.raises(EvalInputError, match="ai2d_test_ids.csv not found"):
        get_benchmark("ai2d").load(ai2d_dir)


def test_ai2d_contamination_reads_the_options(ai2d_dir):
    items = get_benchmark("ai2d").load(ai2d_dir)
    rep = contamination_report([items[0].question + " " + " ".join(items[0].metadata["options"])], items, n=3)
    assert rep.examples[0]["id"] == items[0].id and rep.examples[0]["overlap"] == 1.0
