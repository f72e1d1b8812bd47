"""Loaders and scorers on the real published question files (no images needed to score)."""

import gzip
import json
from pathlib import Path

import pytest

from vlmkit.eval.benchmarks import EvalInputError, get_benchmark

# The published files, gzipped to keep the repository small (sources and licences in the README there).
PACKED = Path(__file__).resolve().parents[1] / "data" / "benchmark-files"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A folder with the files under their official names, as the loaders expect them."""
    folder = tmp_path_factory.mktemp("benchmark-files")
    for packed in PACKED.glob("*.json.gz"):
        (folder / packed.name.removesuffix(".gz")).write_bytes(gzip.decompress(packed.read_bytes()))
    return folder


def gold(items):
    return {it.id: it.answers[0] for it in items}


def test_ocrbench_real_gold_scores_1000(data_dir):
    b = get_benchmark("ocrbench")
    items = b.load(data_dir)
    assert len(items) == 1000 and [it.id for it in items] == [str(i) for i in range(1000)]
    raw = json.loads((data_dir / "OCRBench.json").read_text())
    assert len({r["id"] for r in raw}) < 1000  # the source ids repeat: key by list index
    r = b.score(items, gold(items))
    assert r.display == "1000" and r.overall == 1.0
    assert r.extra["category_points"] == {
        "Text Recognition": 300, "Scene Text-centric VQA": 200, "Doc-oriented VQA": 200,
        "Key Information Extraction": 200, "Handwritten Mathematical Expression Recognition": 100,
    }
    assert set(r.breakdown.values()) == {1.0}
    empty = b.score(items, {})
    assert empty.overall == 0.0 and empty.n_missing == 1000


def test_mathvista_real_gold_hits_official_letter_quirk(data_dir):
    b = get_benchmark("mathvista")
    items = b.load(data_dir)
    assert len(items) == 1000 and items[0].id == "1"
    r = b.score(items, gold(items))
    # pids 168 and 849 have choices written "(a)".."(e)"; the official normaliser reads the
    # gold "(b)" as option letter B and maps it to the second choice, so they score wrong.
    assert sorted(k for k, v in r.per_item.items() if v < 1) == ["168", "849"]
    assert r.display == "99.80%"
    assert r.breakdown["question_type=free_form"] == 1.0
    assert "skills=scientific reasoning" in r.breakdown


def test_mathvista_prompt_has_hint_and_choices(data_dir):
    b = get_benchmark("mathvista")
    items = {it.id: it for it in b.load(data_dir)}
    mc = next(it for it in items.values() if it.metadata["question_type"] == "multi_choice")
    p = b.prompt(mc)
    assert p.startswith("Hint: Please answer the question and provide the correct option letter")
    assert "\nChoices:\n(A) " in p
    assert "two decimal places" in b.prompt(next(it for it in items.values() if it.metadata.get("precision") == 2))


def test_mmmu_answer_dict_gold_and_letters(data_dir):
    b = get_benchmark("mmmu")
    items = b.load(data_dir)
    assert len(items) == 900
    r = b.score(items, gold(items))
    assert r.overall == 1.0 and r.extra["random_fallbacks"] == 0
    assert len([k for k in r.breakdown if k in ("Art and Design", "Business", "Science", "Health and Medicine",
                                                 "Humanities and Social Science", "Tech and Engineering")]) == 6
    assert r.breakdown["Tech and Engineering"] == 1.0  # 7 subjects x 30
    # Free-form responses parse to the same letters; unparseable ones fall back at random.
    preds = {it.id: (f"The correct option is ({it.answers[0]})." if it.metadata["question_type"] == "multiple-choice"
                     else f"The answer is {it.answers[0]}") for it in items}
    assert b.score(items, preds).overall == 1.0
    blank = b.score(items, {it.id: "" for it in items})
    assert blank.extra["random_fallbacks"] == 847  # every multiple-choice item
    assert b.score(items, {it.id: "" for it in items}).overall == blank.overall  # seeded: reproducible


def test_mmmu_instance_weighted_overall(data_dir):
    b = get_benchmark("mmmu", random_fallback=False)  # unparseable -> wrong, for an exact figure
    items = b.load(data_dir)
    preds = gold(items)
    art = [it.id for it in items if it.metadata["subject"] == "Art"]
    for k in art[:15]:
        preds[k] = "Z"
    r = b.score(items, preds)
    assert r.breakdown["Art"] == 0.5 and r.breakdown["Art and Design"] == pytest.approx(105 / 120)
    assert r.overall == pytest.approx(885 / 900)
    assert r.extra["random_fallbacks"] == 15  # counted even when the fallback is off


def test_unknown_prediction_id_is_an_error(data_dir):
    b = get_benchmark("ocrbench")
    items = b.load(data_dir)
    with pytest.raises(EvalInputError, match="not ocrbench items"):
        b.score(items, {"1000": "x"})
