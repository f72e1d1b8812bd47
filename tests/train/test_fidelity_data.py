"""The `fidelity` synthetic data (questions graded by the detail they need), its scoring rules,
and the lecture-claims recipes that train on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.config import load_config
from vlmkit.data.synthetic.fidelity import DIFFICULTIES, FIDELITY_KIND_TASK, generate_fidelity, word_at_size
from vlmkit.data.synthetic.tasks import image_digest
from vlmkit.eval.benchmarks.synth_qa import SyntheticQA, score_answer
from vlmkit.registry import SYNTHETIC_DATA

RECIPES = Path(__file__).resolve().parents[2] / "src" / "vlmkit" / "recipes" / "lecture-claims"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    # 72 held-out images: six full cycles of the 12 (kind, difficulty) pairs.
    paths = SYNTHETIC_DATA.get("fidelity")(out, seed=3, n_train=48, n_test=72)
    return out, paths


def _records(path):
    return json.loads(Path(path).read_text())


def test_every_kind_and_difficulty_is_held_out_and_tagged(data):
    _, paths = data
    assert set(paths) == {"stage2", "test"}
    test = _records(paths["test"])
    assert len(test) == 72
    for r in test:
        assert {"task", "kind", "difficulty", "answer"} <= set(r)
        assert FIDELITY_KIND_TASK[r["kind"]] == r["task"]
        assert r["conversations"][1]["value"] == r["answer"]
    seen = {(r["kind"], r["difficulty"]) for r in test}
    words = {d for k, d in seen if k == "word"}
    assert words == {"8px", "12px", "16px", "24px", "32px"}
    for kind in ("bar-value", "tick"):
        assert {d for k, d in seen if k == kind} == {"10px", "14px", "20px"}
    assert {d for k, d in seen if k == "cell"} == {"3x3", "4x4", "5x5"}
    assert {k for k, d in seen if d == "coarse"} == {"count", "colour", "shape"}
    # Balanced: each (image kind, difficulty) pair holds the same number of held-out images.
    per_pair = {pair: sum(r["image"].endswith(f"_{pair[0]}.png") and r["difficulty"] == pair[1] for r in test)
                for pair in DIFFICULTIES}
    assert set(per_pair.values()) == {6}, per_pair


def test_training_records_ask_every_question_of_their_image(data):
    _, paths = data
    train = _records(paths["stage2"])
    assert len(train) == 48
    turns = {r["task"]: len(r["conversations"]) // 2 for r in train}
    assert turns == {"word": 1, "chart": 3, "table": 2, "scene": 3}
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train)


def test_no_held_out_image_is_a_training_image(data):
    out, paths = data

    def pixels(records):
        return {image_digest(Image.open(out / r["image"]).convert("RGB")) for r in records}

    assert not pixels(_records(paths["stage2"])) & pixels(_records(paths["test"]))


def test_a_repeated_training_image_is_redrawn(tmp_path, monkeypatch):
    # Scenes of two possible images, one trained on: every held-out draw must be the other one.
    from vlmkit.data.synthetic import fidelity

    monkeypatch.setattr(fidelity, "DIFFICULTIES", [("scene", "coarse")])
    monkeypatch.setattr(fidelity, "make_scene", lambda rng: _fixed_scene(rng))
    paths = fidelity.generate_fidelity(tmp_path, n_train=1, n_test=3, seed=0)
    train = {image_digest(Image.open(tmp_path / r["image"]).convert("RGB")) for r in _records(paths["stage2"])}
    test = {image_digest(Image.open(tmp_path / r["image"]).convert("RGB")) for r in _records(paths["test"])}
    assert not train & test


def _fixed_scene(rng):
    from vlmkit.data.synthetic.tasks import Item, Question

    # Two possible images: a redraw finds the other one only by drawing again.
    shade = rng.choice((200, 201))
    return Item(Image.new("RGB", (8, 8), (shade,) * 3), "", [Question("scene", "colour", "q", "red")])


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = generate_fidelity(tmp_path / "a", n_train=12, n_test=12, seed=5)
    b = generate_fidelity(tmp_path / "b", n_train=12, n_test=12, seed=5)
    c = generate_fidelity(tmp_path / "c", n_train=12, n_test=12, seed=6)
    assert _records(a["test"]) == _records(b["test"])
    assert _records(a["stage2"]) == _records(b["stage2"])
    for r in _records(a["test"]):
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
    assert _records(a["test"]) != _records(c["test"])


def _ink_height(img: Image.Image) -> int:
    dark = np.asarray(img.convert("L")) < 128
    rows = np.flatnonzero(dark.any(axis=1))
    return int(rows[-1] - rows[0] + 1)


def test_font_sizes_differ_in_rendered_height():
    heights = [_ink_height(word_at_size(random.Random(0), "light", size)) for size in (8, 12, 16, 24, 32)]
    assert heights == sorted(heights) and len(set(heights)) == 5, heights
    # "light" has an ascender and a descender: its ink spans about the em size.
    assert 6 <= heights[0] <= 10 and 26 <= heights[-1] <= 36, heights


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        SYNTHETIC_DATA.get("fidelity")(tmp_path, n_words=3)


@pytest.mark.parametrize(("task", "prediction", "answer", "right"), [
    ("fidelity-word", "Apple.", "apple", True),
    ("fidelity-word", ' "apple" ', "apple", True),
    ("fidelity-word", "an apple", "apple", False),
    ("fidelity-word", "apples", "apple", False),
    ("fidelity-number", "42", "42", True),
    ("fidelity-number", "42.0", "42", True),
    ("fidelity-number", "42.", "42", True),
    ("fidelity-number", "41", "42", False),  # ChartQA's 5% slack would take this
    ("fidelity-number", "420", "42", False),
    ("fidelity-number", "about 42", "42", False),
    ("fidelity-number", "forty-two", "42", False),
])
def test_exact_word_and_number_rules(task, prediction, answer, right):
    assert score_answer(task, prediction, answer) is right


def test_quickstart_rules_are_unchanged():
    assert score_answer("chart", "41", "42")  # relaxed accuracy keeps its 5% slack
    assert score_answer("text", "the word is apple", "apple")  # OCRBench: the answer inside the reply
    assert score_answer("scene", "Two.", "2")


def test_breakdown_has_kind_at_difficulty(data):
    out, _ = data
    bench = SyntheticQA()
    items = bench.load(out)
    right = {it.id: it.answers[0] for it in items if it.metadata["kind"] == "word"}
    result = bench.score(items, right)
    assert result.breakdown["word"] == 1.0 and result.breakdown["word@8px"] == 1.0
    assert result.breakdown["cell@5x5"] == 0.0 and result.breakdown["task/fidelity-number"] == 0.0


# Each recipe with the values its header's sweep varies (the extremes of each `--vary`).
SWEPT = {
    "connectors": [],
    "fidelity": ["model.processor.image_size=512", "model.connector.options.ratio=1.0"],
    "stages": ["train.stages.embed.trainable=connector+vision", "train.stages.instruct.trainable=connector+vision"],
}


@pytest.mark.parametrize("name", list(SWEPT))
def test_lecture_claims_recipes_load_with_their_swept_values(name):
    text = (RECIPES / f"{name}.yaml").read_text()
    config = load_config(RECIPES / f"{name}.yaml", SWEPT[name])
    assert config.train.eval is None
    assert [s.max_steps for s in config.train.stages.values()] == [300, 80]
    assert config.model.vision.name == "efficientnet-lite0" and config.model.llm.name == "smollm2-135m-instruct"
    if name == "fidelity":
        assert config.model.processor.image_size == 512 and config.model.connector.options["ratio"] == 1.0
    if name == "stages":
        assert all(s.trainable == ["connector", "vision"] for s in config.train.stages.values())
    # The header's command names this recipe and the fidelity data.
    assert f"lecture-claims/{name}.yaml --data fidelity" in text


def test_trainable_parts_joined_with_plus_are_refused_when_unknown():
    from vlmkit.config import ConfigError

    with pytest.raises(ConfigError, match="unknown parts \\['visoin'\\]"):
        load_config(RECIPES / "stages.yaml", ["train.stages.embed.trainable=connector+visoin"])
