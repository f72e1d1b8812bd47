"""MMBench (circular), MMStar and MMMU-Pro: the official answer rules on hand-computed vectors, in
the official layouts, and through `eval run` into results that name their rule."""

import base64
import io
import json

import pytest
from PIL import Image

from vlmkit.eval.benchmarks import EvalInputError, get_benchmark
from vlmkit.eval.choice_rules import MMMUProParser, mmstar_correct, vlmevalkit_can_infer, vlmevalkit_prediction_text
from vlmkit.eval.runner import run_benchmark
from vlmkit.eval.synth import GOLD_NAME, synth_bench

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHOICES = {"A": "a red apple", "B": "the blue sky", "C": "green grass", "D": "black cat"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("response, letter", [
    ("Yes, there is a cat.", None),  # no letter, and "cat" alone is no option's text
    ("(C)", "C"),
    ("The answer is D", "D"),
    ("the answer is d", "D"),  # the verbose-answer regex is case-insensitive, letter included
    ("B. the red one", "B"),
    ("", None),  # read back as "nan", which is in no option
    ("green grass", "C"),  # the option's text instead of its letter
    ("c", None),  # a lower-case letter is not a letter to can_infer_option
    ("C.", "C"),  # trailing punctuation is split off
    ("A cat is sitting on the mat", None),  # a leading "A" among 7 words is too early to count
    ("I choose A or B", None),  # two letters: no option rule; the text rule finds nothing
    ("The correct answer is **B**. It shows the sky above the hills on a clear day", "B"),
    ("I can't process this file.", "Z"),
])
def test_vlmevalkit_can_infer_vectors(response, letter):
    assert vlmevalkit_can_infer(vlmevalkit_prediction_text(response), dict(CHOICES)) == letter


def test_vlmevalkit_empty_response_is_read_as_nan():
    # VLMEvalKit reads predictions from a spreadsheet: "" becomes NaN, then the text "nan".
    assert vlmevalkit_can_infer(vlmevalkit_prediction_text(""), {"A": "an", "B": "one"}) == "A"  # "an" is in "nan"
    assert vlmevalkit_can_infer("", {"A": "an", "B": "one"}) is None


@pytest.mark.parametrize("response, gold, ok", [
    ("Yes, there is a cat.", "A", False), ("(C)", "C", True), ("The answer is D", "D", True),
    ("B. the red one", "B", True), ("", "A", False), ("green grass", "C", False), ("c", "C", True),
    ("d.", "D", True), ("Option b", "B", True), ("A cat", "A", True),  # the first letter, even as an article
    ("Answer: B", "B", False), ("(", "A", False),
])
def test_mmstar_rule_vectors(response, gold, ok):
    assert mmstar_correct(response, gold) is ok


def test_mmmu_pro_parser_vectors():
    letters = list("ABCDEFGHIJ")
    idx = {c: f"choice {c.lower()}{c.lower()}" for c in letters}
    p = MMMUProParser(seed=0)
    assert p.parse("Reasoning...\nAnswer: C", letters, idx) == ("C", False)
    assert p.parse("Answer: AB", letters, idx) == ("B", False)  # two letters after Answer:, then "B " wins
    assert p.parse("(C)", letters, idx) == ("C", False)
    assert p.parse("The answer is D", letters, idx) == ("D", False)
    assert p.parse("B. the red one", letters, idx) == ("B", False)
    assert p.parse("I think so", letters, idx) == ("I", False)  # "I " is option I, as in evaluate.py
    assert p.parse("I think so, it is E", letters, idx) == ("E", False)  # the later of " E " and " I " wins
    assert p.parse("it is clearly the one called choice dd", letters, idx) == ("D", False)  # option text, > 5 words
    assert p.parse("C.", letters, idx) == ("C", False)  # trailing punctuation is stripped
    assert p.random_fallbacks == 0
    assert p.parse("Yes, there is a cat.", letters, idx)[1]  # five words: too short for the option-text search
    p.random_fallbacks = 0
    assert p.parse("", letters, idx)[1] and p.parse("c", letters, idx)[1] and p.random_fallbacks == 2
    # The draws are seeded: two parsers with the same seed draw the same letters.
    q1, q2 = MMMUProParser(seed=3), MMMUProParser(seed=3)
    assert [q1.parse("", letters, idx)[0] for _ in range(5)] == [q2.parse("x", letters, idx)[0] for _ in range(5)]


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------


def _mmbench_tsv(path):
    """Three questions: q0 with 4 options (4 rotations), q1 with 2, q2 with 3."""
    img = base64.b64encode(_png()).decode()
    rows = []
    specs = [(0, ["cat", "dog", "cow", "hen"], 2, "ocr", "finegrained_perception (instance-level)"),
             (1, ["yes", "no"], 0, "ocr", "finegrained_perception (instance-level)"),
             (2, ["red", "blue", "green"], 1, "image_scene", "coarse_perception")]
    for g, opts, right, cat, l2 in specs:
        for r in range(len(opts)):
            rot = opts[r:] + opts[:r]
            cells = {c: (rot[i] if i < len(rot) else None) for i, c in enumerate("ABCD")}
            rows.append({"index": g + r * 1_000_000, "question": f"q{g}?", "hint": None, **cells,
                         "answer": "ABCD"[rot.index(opts[right])], "category": cat,
                         "image": img if r == 0 else str(g), "l2-category": l2, "split": "dev"})
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    return {str(r["index"]): r["answer"] for r in rows}


def test_mmbench_circular_score_by_hand(tmp_path):
    gold = _mmbench_tsv(tmp_path)
    b = get_benchmark("mmbench")
    items = b.load(tmp_path)
    assert len(items) == 9 and items[0].images and b.cluster_key("2000001") == "1"
    assert b.prompt(items[0]) == ("Question: q0?\nOptions:\nA. cat\nB. dog\nC. cow\nD. hen\n"
                                  "Please select the correct answer from the options above. \n")
    # q0: right in every rotation, in four answer forms (gold C, B, A, D for rotations 0..3).
    assert [gold[k] for k in ("0", "1000000", "2000000", "3000000")] == ["C", "B", "A", "D"]
    preds = {"0": "(C)", "1000000": "The answer is B", "2000000": "cow", "3000000": "D."}
    # q1 (gold A then B): the second rotation answers A, so the question fails, settled by the rules.
    preds |= {"1": "A", "1000001": "A"}
    # q2 (gold B, A, C): the last rotation's answer matches no letter: fails, but a judge could read it.
    preds |= {"2": "B", "1000002": "A", "2000002": "Yes, there is a cat."}
    r = b.score(items, preds)
    assert r.per_item == {"0": 1.0, "1": 0.0, "2": 0.0}
    assert r.overall == pytest.approx(1 / 3) and r.display == "33.33"
    assert r.breakdown == {"CP": 0.0, "FP-S": 0.5, "image_scene": 0.0, "ocr": 0.5}
    assert r.extra["judge_could_change_ids"] == ["2"] and r.extra["unmatched_rotations"] == 1
    # A missing rotation fails its question; the others keep their scores.
    r = b.score(items, {k: v for k, v in preds.items() if k != "3000000"})
    assert r.per_item["0"] == 0.0 and r.n_missing == 1
    assert b.score(items, gold).overall == 1.0


def test_mmbench_bad_rows_are_named(tmp_path):
    _mmbench_tsv(tmp_path)
    frame = pd.read_csv(tmp_path / "MMBench_DEV_EN.tsv", sep="\t")
    frame.loc[4, "answer"] = "C"  # q1 has two options: VLMEvalKit scores it, and it can never pass
    frame.to_csv(tmp_path / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    b = get_benchmark("mmbench")
    items = b.load(tmp_path)
    assert b.score(items, {it.id: it.answers[0] for it in items}).per_item["1"] == 0.0
    frame.loc[4, "answer"] = "(C)"
    frame.to_csv(tmp_path / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    with pytest.raises(EvalInputError, match=r"MMBench_DEV_EN.tsv: row 6 \(index 1\): answer '\(C\)' is not an option letter"):
        b.load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("index\tquestion\n1\tq\n")
    with pytest.raises(EvalInputError, match="missing column"):
        get_benchmark("mmbench").load(tmp_path)


# ---------------------------------------------------------------------------------------------
# MMStar
# ---------------------------------------------------------------------------------------------


def test_mmstar_score_by_hand(tmp_path):
    cats = [("math", "geometry"), ("math", "geometry"), ("math", "statistical reasoning"), ("coarse perception", "image emotion")]
    rows = [{"index": i, "question": f"q{i}\nOptions: A: x, B: y, C: z, D: w", "image": {"bytes": _png(), "path": None},
             "answer": "ABCD"[i], "category": c, "l2_category": s, "meta_info": {"source": "t"}}
            for i, (c, s) in enumerate(cats)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmstar.parquet")
    b = get_benchmark("mmstar")
    items = b.load(tmp_path)
    assert b.prompt(items[0]).endswith("Options: A: x, B: y, C: z, D: w\nAnswer with the option's letter from the given choices directly.")
    r = b.score(items, {"0": "A", "1": "(b) because", "2": "The answer is D", "3": "d"})
    assert r.per_item == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 1.0}
    assert r.overall == 0.75 and r.display == "0.7500"
    assert r.breakdown == {"coarse perception": 1.0, "coarse perception(image emotion)": 1.0, "math": 2 / 3,
                           "math(geometry)": 1.0, "math(statistical reasoning)": 0.0}
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rows[0].items() if k != "l2_category"}]), tmp_path / "mmstar.parquet")
    with pytest.raises(EvalInputError, match="mmstar.parquet: missing column.*l2_category"):
        b.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# MMMU-Pro
# ---------------------------------------------------------------------------------------------


def test_mmmu_pro_fallback_is_seeded_and_reported_as_a_range(tmp_path):
    synth_bench("mmmu-pro-standard", tmp_path, n=12)
    b = get_benchmark("mmmu-pro-standard")
    items = b.load(tmp_path)
    assert len(items) == 12 and len(items[0].metadata["options"]) == 10
    assert b.prompt(items[0]).startswith("Which word is written in <image 1>?\nA. ")
    gold = {it.id: it.answers[0] for it in items}
    preds = dict(gold)
    for it in items[:4]:
        preds[it.id] = "I cannot tell."  # "I " names option I, as evaluate.py reads it
    for it in items[4:8]:
        preds[it.id] = "hmm"  # nothing to parse: a random letter
    r = b.score(items, preds)
    right_fixed = 4 + sum(it.answers[0] == "I" for it in items[:4])
    lo, hi = r.extra["random_fallback_range"]
    assert r.extra["random_fallbacks"] == 4
    assert lo == pytest.approx(right_fixed / 12) and hi == pytest.approx((right_fixed + 4) / 12)
    assert lo <= r.overall <= hi
    assert r.overall == get_benchmark("mmmu-pro-standard").score(items, preds).overall  # same seed, same draws
    for seed in range(5):
        assert lo <= get_benchmark(f"mmmu-pro-standard?seed={seed}").score(items, preds).overall <= hi
    with pytest.raises(EvalInputError, match="no MMMU-Pro parquet"):
        get_benchmark("mmmu-pro-vision").load(tmp_path / "standard (10 options)" / "..")


def test_mmmu_pro_vision_layout(tmp_path):
    synth_bench("mmmu-pro-vision", tmp_path, n=3)
    assert (tmp_path / "vision" / "test-00000-of-00001.parquet").is_file()
    b = get_benchmark("mmmu-pro-vision")
    items = b.load(tmp_path)
    assert len(items[0].images) == 1 and "'Answer: $LETTER'" in b.prompt(items[0])
    assert b.score(items, {it.id: f"Long thoughts.\nAnswer: {it.answers[0]}" for it in items}).overall == 1.0


# ---------------------------------------------------------------------------------------------
# eval run: error bars and the rule in results.json
# ---------------------------------------------------------------------------------------------


class PromptBackend:
    name = "by-prompt"

    def __init__(self, table):
        self.table = table

    def generate(self, batch, max_new_tokens):
        return [self.table[p] for p, _ in batch]


def test_run_results_name_the_rule_and_carry_error_bars(tmp_path):
    d = tmp_path / "mmbench"
    synth_bench("mmbench", d, n=8)
    b = get_benchmark("mmbench")
    items = b.load(d)
    gold = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in (d / GOLD_NAME).read_text().splitlines()}
    answers = {b.prompt(it): gold[int(it.id)] for it in items}
    out = run_benchmark(b, items, PromptBackend(answers), tmp_path / "run", model_spec="fake", data_dir=str(d),
                        progress=False)
    res = json.loads((out.out_dir / "results.json").read_text())
    assert res["overall"] == 1.0 and res["ci"]["overall"] == [1.0, 1.0]
    assert set(res["scorer"]) == {"scorer", "metric", "source", "version", "answer_extraction", "prompt_template"}
    assert "VLMEvalKit" in res["scorer"]["source"] and res["scorer"]["answer_extraction"] == b.parser
    assert res["scorer"]["prompt_template"] == b.prompt_template and res["error_bars"]["clusters"] == 8
    scores = [json.loads(line) for line in (out.out_dir / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 8 and {"id", "score", "cluster", "groups"} <= set(scores[0])
    assert "95% CI" in (out.out_dir / "results.md").read_text()


def test_mmbench_contamination_reads_option_texts(tmp_path):
    from vlmkit.eval.contamination import item_parts

    _mmbench_tsv(tmp_path)
    item = get_benchmark("mmbench").load(tmp_path)[0]
    assert item_parts(item) == ["q0?", "cat", "dog", "cow", "hen"]
