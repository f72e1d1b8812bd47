"""POPE, MME and HallusionBench: their official answer rules and figures on hand-computed
vectors, their official layouts, MME's eval-tool worked example and the real question files."""

import gzip
import json
from pathlib import Path

import pytest

from vlmkit.eval.benchmarks import EvalInputError, get_benchmark
from vlmkit.eval.benchmarks.hallusionbench import yorn
from vlmkit.eval.benchmarks.mme import mme_answer
from vlmkit.eval.benchmarks.pope import pope_answer
from vlmkit.eval.contamination import contamination_report
from vlmkit.eval.runner import run_benchmark
from vlmkit.eval.synth import synth_bench

PACKED = Path(__file__).resolve().parents[1] / "data" / "benchmark-files"


def _unpack(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / name).write_bytes(gzip.decompress((PACKED / f"{name}.gz").read_bytes()))
    return dest / name


# -- POPE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer", [
    ("Yes, there is a cat.", "yes"), ("No.", "no"), ("No, there is no cat.", "no"), ("There is not a cat.", "no"),
    ("Yes. No, not at all.", "yes"),  # only the first sentence counts
    ("There is a dog, no cat", "no"),  # commas dropped: "no" is a word
    ("NO", "yes"), ("Not at all", "yes"), ("Nope", "yes"), ("", "yes"),  # the rule's quirks: only No/no/not
    ("no", "no"),
])
def test_pope_answer_rule(response, answer):
    assert pope_answer(response) == answer


def _pope_dir(root: Path, lines_by_split: dict) -> Path:
    for split, lines in lines_by_split.items():
        path = root / "output" / "coco" / f"coco_pope_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_pope_per_split_figures_by_hand(tmp_path):
    labels = ["yes", "yes", "no", "no", "yes"]
    lines = [{"question_id": i + 1, "image": f"COCO_val2014_{i // 2:012d}.jpg", "text": f"Is there a thing {i}?",
              "label": lab} for i, lab in enumerate(labels)]
    d = _pope_dir(tmp_path, {"random": lines, "adversarial": lines[:2]})
    b = get_benchmark("pope")
    items = b.load(d)
    assert [it.id for it in items[:2]] == ["random/1", "random/2"] and items[5].id == "adversarial/1"
    preds = {"random/1": "Yes, there is.", "random/2": "No.", "random/3": "yes", "random/4": "There is not.",
             "random/5": "Yes", "adversarial/1": "no"}  # adversarial/2 missing: counts as wrong
    r = b.score(items, preds)
    # random: TP=2 (1, 5), FN=1 (2), FP=1 (3), TN=1 (4)
    assert r.extra["confusion"]["random"] == {"TP": 2, "FP": 1, "TN": 1, "FN": 1}
    assert r.breakdown["random/accuracy"] == pytest.approx(3 / 5)
    assert r.breakdown["random/precision"] == pytest.approx(2 / 3) and r.breakdown["random/recall"] == pytest.approx(2 / 3)
    assert r.breakdown["random/f1"] == pytest.approx(2 / 3) and r.breakdown["random/yes_ratio"] == pytest.approx(3 / 5)
    # adversarial: one answered item, a false "no"; no "yes" answered, so precision is 0, not a division by zero
    assert r.breakdown["adversarial/accuracy"] == 0.0 and r.breakdown["adversarial/precision"] == 0.0
    assert r.extra["f1_mean"] == pytest.approx(1 / 3) and r.overall == pytest.approx(3 / 7) and r.n_missing == 1
    assert b.cluster_key("random/1") == b.cluster_key("random/2") == b.cluster_key("adversarial/1") != b.cluster_key("random/3")


def test_pope_bad_label_names_the_line(tmp_path):
    d = _pope_dir(tmp_path, {"popular": [{"question_id": 1, "image": "a.jpg", "text": "q", "label": "maybe"}]})
    with pytest.raises(EvalInputError, match=r"coco_pope_popular.json:1: label 'maybe'"):
        get_benchmark("pope").load(d)


def test_pope_real_files(tmp_path):
    for split in ("random", "popular", "adversarial"):
        _unpack(f"coco_pope_{split}.json", tmp_path / "output" / "coco")
    b = get_benchmark("pope")
    items = b.load(tmp_path)
    assert len(items) == 9000 and items[3000].id == "popular/1"
    r = b.score(items, {it.id: "Yes" for it in items})  # always yes: half the labels are yes
    for split in ("random", "popular", "adversarial"):
        assert r.breakdown[f"{split}/precision"] == 0.5 and r.breakdown[f"{split}/recall"] == 1.0
        assert r.breakdown[f"{split}/f1"] == pytest.approx(2 / 3) and r.breakdown[f"{split}/yes_ratio"] == 1.0
    assert len({b.cluster_key(it.id) for it in items}) == len({it.metadata["image"] for it in items})


# -- MME -------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer", [
    ("Yes", "yes"), ("yes", "yes"), ("No, there is none.", "no"), ("not sure", "no"), ("Nope", "no"),
    (" yes", "yes"), ("The answer is yes", "other"), ("", "other"), ("Y", "other"), ("(C)", "other"),
    ("yesno", "yes"), ("I think no", "other"), ("A: yes", "other"),  # only the first four characters are read
])
def test_mme_answer_rule(response, answer):
    assert mme_answer(response) == answer


def _mme_subtask(root: Path, subtask: str, images: dict, nested: bool = False) -> None:
    base = root / "MME_Benchmark_release_version" / subtask
    img_dir, txt_dir = (base / "images", base / "questions_answers_YN") if nested else (base, base)
    img_dir.mkdir(parents=True, exist_ok=True)
    txt_dir.mkdir(parents=True, exist_ok=True)
    for name, qa in images.items():
        (img_dir / name).write_bytes(b"")  # scoring never opens the images
        stem = name.rsplit(".", 1)[0]
        (txt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))


def test_mme_scores_by_hand(tmp_path):
    qa = [("Is there a cat? Please answer yes or no.", "Yes"), ("Is there a dog? Please answer yes or no.", "No")]
    _mme_subtask(tmp_path, "existence", {"1.jpg": qa, "2.jpg": qa})
    _mme_subtask(tmp_path, "celebrity", {"a.jpg": qa}, nested=True)
    _mme_subtask(tmp_path, "code_reasoning", {"0020.png": qa})
    b = get_benchmark("mme")
    items = b.load(tmp_path)
    assert [it.id for it in items[:2]] == ["existence/1.jpg#0", "existence/1.jpg#1"] and items[4].id == "celebrity/a.jpg#0"
    preds = {"existence/1.jpg#0": "Yes, there is.", "existence/1.jpg#1": "no", "existence/2.jpg#0": "yes",
             "existence/2.jpg#1": "The answer is no.", "celebrity/a.jpg#0": "yes", "celebrity/a.jpg#1": "yes",
             "code_reasoning/0020.png#0": "Yes", "code_reasoning/0020.png#1": "No"}
    r = b.score(items, preds)
    # existence: 3 of 4 right, 1 of 2 images fully right -> 75 + 50; celebrity: 1/2, 0/1 -> 50
    assert r.breakdown["existence/acc"] == 0.75 and r.breakdown["existence/acc+"] == 0.5
    assert r.extra["subtask_scores"] == {"existence": 125.0, "celebrity": 50.0, "code_reasoning": 200.0}
    assert r.extra["perception"] == 175.0 and r.extra["cognition"] == 200.0 and r.extra["other_answers"] == 1
    assert r.display == "perception 175.00, cognition 200.00" and not r.extra["all_subtasks"]
    assert b.cluster_key("existence/1.jpg#1") == b.cluster_key("existence/1.jpg#0") != b.cluster_key("existence/2.jpg#0")


def test_mme_bad_question_file(tmp_path):
    _mme_subtask(tmp_path, "count", {"1.jpg": [("q1", "Yes"), ("q2", "No"), ("q3", "No")]})
    with pytest.raises(EvalInputError, match=r"1.txt: 3 question line\(s\); MME asks two"):
        get_benchmark("mme").load(tmp_path)
    _mme_subtask(tmp_path, "count", {"1.jpg": [("q1", "Yes"), ("q2", "Maybe")]})
    with pytest.raises(EvalInputError, match=r"1.txt:2: expected"):
        get_benchmark("mme").load(tmp_path)


def test_mme_eval_tool_worked_example(tmp_path):
    """The release's eval tool scores LaVIN's answers (eval_tool/LaVIN/*.txt) and prints these
    totals (the MME leaderboard lists LaVIN at 963.61 perception, 249.64 cognition)."""
    rows = [ln.split("\t") for ln in gzip.decompress((PACKED / "mme_eval_tool_lavin.tsv.gz").read_bytes()).decode().splitlines()[1:]]
    by_image: dict = {}
    for subtask, image, gt, _ in rows:
        by_image.setdefault(subtask, {}).setdefault(image, []).append((f"question {len(by_image.get(subtask, {}))}", gt))
    nested = {"posters", "celebrity", "scene", "landmark", "artwork"}  # the release's images/ + questions_answers_YN/
    for subtask, images in by_image.items():
        _mme_subtask(tmp_path, subtask, images, nested=subtask in nested)
    b = get_benchmark("mme")
    items = b.load(tmp_path)
    seen: dict = {}
    preds = {}
    for subtask, image, _, response in rows:
        k = seen[(subtask, image)] = seen.get((subtask, image), -1) + 1
        preds[f"{subtask}/{image}#{k}"] = response
    r = b.score(items, preds)
    assert len(items) == 2374 and r.extra["all_subtasks"]
    assert r.extra["perception"] == pytest.approx(963.6114445778312, abs=1e-9)
    assert r.extra["cognition"] == pytest.approx(249.64285714285714, abs=1e-9)
    assert r.extra["subtask_scores"] == pytest.approx({
        "existence": 185.0, "count": 88.33333333333334, "position": 63.333333333333336, "color": 75.0,
        "posters": 79.59183673469389, "celebrity": 47.35294117647059, "scene": 136.75, "landmark": 93.5,
        "artwork": 87.25, "OCR": 107.5, "commonsense_reasoning": 87.14285714285714, "numerical_calculation": 65.0,
        "text_translation": 47.5, "code_reasoning": 50.0}, abs=1e-9)


# -- HallusionBench --------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer", [
    ("Yes, there is a cat.", "Yes"), ("No.", "No"), ("YES!", "Yes"), ("The answer is no.", "No"),
    ("yes and no", "Unknown"), ("", "Unknown"), ("Not really", "Unknown"), ("(C)", "Unknown"),
])
def test_hallusion_yes_no_extraction(response, answer):
    assert yorn(response) == answer


def _hb_row(cat, sub, set_id, fig, qid, gt, filename):
    return {"category": cat, "subcategory": sub, "visual_input": "0" if filename is None else "1", "set_id": str(set_id),
            "figure_id": str(fig), "sample_note": "", "question_id": str(qid), "question": f"Question {qid}?",
            "gt_answer_details": "", "gt_answer": gt, "filename": filename}


def test_hallusion_figures_by_hand(tmp_path):
    rows = [_hb_row("VD", "illusion", 0, 0, 0, "1", "./VD/illusion/0_0.png"), _hb_row("VD", "illusion", 0, 0, 1, "0", "./VD/illusion/0_0.png"),
            _hb_row("VD", "illusion", 0, 1, 0, "0", "./VD/illusion/0_1.png"), _hb_row("VD", "illusion", 0, 1, 1, "1", "./VD/illusion/0_1.png"),
            _hb_row("VS", "chart", 0, 0, 0, "1", None), _hb_row("VS", "chart", 0, 1, 0, "0", "./VS/chart/0_1.png")]
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows))
    b = get_benchmark("hallusionbench")
    items = b.load(tmp_path)
    assert items[4].id == "VS_chart_0_0_0" and items[4].images == [] and items[0].images[0].name == "0_0.png"
    preds = {"VD_illusion_0_0_0": "Yes.", "VD_illusion_0_0_1": "No", "VD_illusion_0_1_0": "yes and no",
             "VD_illusion_0_1_1": "Yes", "VS_chart_0_0_0": "I cannot tell without the chart.", "VS_chart_0_1_0": "No"}
    r = b.score(items, preds)
    # Right: all but VD 0_1_0 (Unknown: wrong with a figure); VS 0_0_0 is Unknown without a figure: right.
    # Figures: VD_0 right, VD_1 wrong, VS_1 right (VS_0 has no figure). Questions: VD q0 wrong, VD q1, VS q0 right.
    assert r.breakdown["Overall/aAcc"] == pytest.approx(5 / 6) and r.overall == pytest.approx(5 / 6)
    assert r.breakdown["Overall/fAcc"] == pytest.approx(2 / 3) and r.breakdown["Overall/qAcc"] == pytest.approx(2 / 3)
    assert (r.breakdown["VD/aAcc"], r.breakdown["VD/fAcc"], r.breakdown["VD/qAcc"]) == (0.75, 0.5, 0.5)
    assert (r.breakdown["VS/aAcc"], r.breakdown["VS/fAcc"], r.breakdown["VS/qAcc"]) == (1.0, 1.0, 1.0)
    assert r.extra["judge_dependent_ids"] == ["VD_illusion_0_1_0", "VS_chart_0_0_0"]
    assert b.cluster_key("VD_illusion_0_1_0") == b.cluster_key("VD_illusion_0_0_1") != b.cluster_key("VS_chart_0_1_0")


def test_hallusion_real_file(tmp_path):
    _unpack("HallusionBench.json", tmp_path)
    b = get_benchmark("hallusionbench")
    items = b.load(tmp_path)
    assert len(items) == 1129 and sum(not it.images for it in items) == 178
    assert sum(it.metadata["category"] == "VD" for it in items) == 591
    r = b.score(items, {it.id: "Yes" for it in items})
    assert r.breakdown["Overall/aAcc"] == pytest.approx(484 / 1129)  # the 484 questions whose answer is yes
    assert r.extra["judge_dependent"] == 0


def test_contamination_finds_a_leaked_pope_question(tmp_path):
    _unpack("coco_pope_random.json", tmp_path)
    items = get_benchmark("pope").load(tmp_path)[:20]
    texts = ["Is there a snowboard in the image? yes", "Describe the picture."]
    rep = contamination_report(texts, items, n=4)
    assert rep.n_contaminated >= 1 and {"id": "random/1", "overlap": 1.0} in [
        {k: e[k] for k in ("id", "overlap")} for e in rep.examples]


class AlwaysYes:
    name = "always-yes"

    def __init__(self):
        self.asked = []

    def generate(self, batch, max_new_tokens):
        self.asked += [len(images) for _, images in batch]
        return ["Yes" for _ in batch]


def test_eval_run_asks_figureless_questions_without_an_image(tmp_path):
    d = tmp_path / "hb"
    synth_bench("hallusionbench", d, n=4)
    rows = json.loads((d / "HallusionBench.json").read_text())
    rows.append({**rows[-1], "category": "VS", "subcategory": "chart", "set_id": "9", "figure_id": "0", "visual_input": "0",
                 "filename": None, "question_id": "0", "gt_answer": "0"})
    (d / "HallusionBench.json").write_text(json.dumps(rows))
    b = get_benchmark("hallusionbench")
    items = b.load(d)
    backend = AlwaysYes()
    out = run_benchmark(b, items, backend, tmp_path / "out", model_spec="always-yes", batch_size=3, progress=False)
    assert backend.asked == [1] * (len(items) - 1) + [0]
    n_yes = sum(it.answers == ["Yes"] for it in items)
    assert out.result.n_missing == 0 and out.result.overall == pytest.approx(n_yes / len(items))
