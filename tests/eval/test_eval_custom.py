"""`custom:FILE`: a user's own held-out file (LLaVA or messages records, JSON or JSONL), the last
assistant turn as the reference, scored by a named metric; bad records named; the CLI on a tiny
checkpoint; `eval run --help` lists what `eval list` lists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests._tiny import tiny_config
from vlmkit import checkpoint as ckpt
from vlmkit.cli import app
from vlmkit.config import load_config
from vlmkit.core.types import Message
from vlmkit.eval.backends import VlmkitBackend
from vlmkit.eval.benchmarks import EvalInputError, get_benchmark, parse_spec
from vlmkit.eval.benchmarks.custom import METRICS
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.registry import BENCHMARKS


def _image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour).save(path)


@pytest.fixture
def heldout(tmp_path) -> Path:
    """Two LLaVA records (one multi-turn with a system turn) and two `messages` records, JSON."""
    _image(tmp_path / "img" / "a.png", (200, 20, 20))
    _image(tmp_path / "img" / "b.png", (20, 20, 200))
    records = [
        {"id": "l1", "image": "img/a.png", "task": "colour",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"}]},
        {"id": "l2", "image": "img/b.png", "task": "chart",
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"},
                           {"from": "human", "value": "And the value?"}, {"from": "gpt", "value": "40"}]},
        {"id": "m1", "images": ["img/a.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the sign."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the big apple"}]}]},
        {"id": "m2", "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "two"}]},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path


def test_reads_llava_and_messages_records_last_assistant_turn_is_the_answer(heldout):
    bench = get_benchmark("custom")
    items = {it.id: it for it in bench.load(heldout)}
    assert [it.answers for it in items.values()] == [["Red"], ["40"], ["the big apple"], ["two"]]
    assert items["l1"].images == [heldout.parent / "img" / "a.png"]
    assert items["m1"].images == [heldout.parent / "img" / "a.png"] and items["m2"].images == []
    # One user turn: the backend is asked its text. More turns: the conversation so far, as messages.
    prompt, images = bench.request(items["l1"])
    assert prompt == "<image>\nWhat colour?" and len(images) == 1 and isinstance(images[0], Image.Image)
    assert bench.request(items["m1"])[0] == "<image>Read the sign."
    turns, _ = bench.request(items["l2"])
    assert turns == [Message("system", "Be brief."), Message("user", "<image>\nWhat colour?"),
                     Message("assistant", "blue"), Message("user", "And the value?")]
    # JSONL reads the same.
    jsonl = heldout.with_suffix(".jsonl")
    jsonl.write_text("\n".join(json.dumps(r) for r in json.loads(heldout.read_text())) + "\n")
    assert [it.answers for it in bench.load(jsonl)] == [it.answers for it in items.values()]


@pytest.mark.parametrize("metric, expected", [
    # l1 "Red" / l2 "40" / m1 "the big apple" / m2 "two"
    ("exact", {"l1": 1.0, "l2": 0.0, "m1": 0.0, "m2": 1.0}),
    ("contains", {"l1": 1.0, "l2": 0.0, "m1": 1.0, "m2": 1.0}),
    ("relaxed", {"l1": 1.0, "l2": 1.0, "m1": 0.0, "m2": 1.0}),
    # ANLS: 1 - edit distance / longer length, lower-cased; "red." against "Red" is 1 edit in 4.
    ("anls", {"l1": 0.75, "l2": 0.5, "m1": pytest.approx(1 - 2 / 13), "m2": 1.0}),
])
def test_each_metric_on_known_answers(heldout, metric, expected):
    bench = get_benchmark(f"custom?metric={metric}")
    items = bench.load(heldout)
    predictions = {"l1": "red.", "l2": "41", "m1": "The big apple is written", "m2": "2"}
    if metric == "anls":
        predictions.update(m1="the big appel", m2="two")
    result = bench.score(items, predictions)
    assert result.per_item == expected
    assert result.overall == pytest.approx(sum(result.per_item.values()) / 4)
    assert result.metric.startswith(f"{metric}: ")
    # Records with a `task` are broken down by it; m1 and m2 have none.
    assert result.breakdown == {"chart": expected["l2"], "colour": expected["l1"]}


def test_metric_and_data_in_the_spec():
    assert parse_spec("custom:dir/my test.json?metric=anls") == ("custom", "dir/my test.json", {"metric": "anls"})
    assert parse_spec("custom?metric=contains") == ("custom", None, {"metric": "contains"})
    assert parse_spec("synth-qa") == ("synth-qa", None, {})
    assert set(METRICS) == {"exact", "contains", "relaxed", "anls"}
    with pytest.raises(EvalInputError, match="unknown metric 'bleu'; metrics: exact, contains, relaxed, anls"):
        get_benchmark("custom?metric=bleu")
    with pytest.raises(EvalInputError, match="benchmark 'chartqa' takes no option 'metric'"):
        get_benchmark("chartqa?metric=anls")


def test_records_it_cannot_score_are_named_with_the_reason(tmp_path):
    _image(tmp_path / "ok.png", (0, 0, 0))
    lines = [
        {"id": "fine", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "no-answer", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "empty", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "  "}]},
        {"id": "gone", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(EvalInputError) as e:
        get_benchmark("custom").load(path)
    text = str(e.value)
    assert f"4 record(s) of {path} cannot be scored" in text
    assert f"{path}:2: record 'no-answer': has no assistant turn" in text
    assert f"{path}:3: record 'empty': has an empty answer" in text
    assert f"{path}:4: record 'gone': image or video not found: {tmp_path / 'missing.png'}" in text
    assert f"{path}:5: record '#4': has no assistant turn" in text
    assert "KeyError" not in text
    with pytest.raises(EvalInputError, match="not a folder"):
        get_benchmark("custom").load(tmp_path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, VisionLanguageModel]:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)
    model.set_trainable(["connector"])
    folder = tmp_path_factory.mktemp("ck") / "ck"
    ckpt.save_checkpoint(folder, model, load_config({"model": tiny_config("mlp").model_dump(mode="json")}))
    return folder, model.eval()


def test_cli_scores_the_file_with_the_models_answers(heldout, tiny_checkpoint, tmp_path):
    folder, model = tiny_checkpoint
    bench = get_benchmark("custom?metric=contains")
    items = bench.load(heldout)
    backend = VlmkitBackend(model)
    expected = {it.id: a.strip() for it, a in zip(items, backend.generate([bench.request(it) for it in items], 6))}
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "run", "-b", f"custom:{heldout}?metric=contains", "-m", f"vlmkit:{folder}",
                                   "-o", str(out), "--max-new-tokens", "6", "--batch-size", "3", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["benchmark"] == "custom" and report["n_items"] == 4 and report["n_missing"] == 0
    cached = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert cached == expected
    scored = bench.score(items, expected)
    assert report["overall"] == scored.overall
    # The same cached answers rescored by `eval score` with another metric.
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in expected.items()))
    again = CliRunner().invoke(app, ["eval", "score", "-b", f"custom:{heldout}", "-p", str(preds), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["overall"] == get_benchmark("custom").score(items, expected).overall


def test_cli_data_given_once_and_bad_records_named(heldout, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    twice = CliRunner().invoke(app, ["eval", "run", "-b", f"custom:{heldout}", "-d", str(heldout), "-m", f"vlmkit:{folder}"])
    assert twice.exit_code == 2 and "the data is given twice" in twice.output
    none = CliRunner().invoke(app, ["eval", "run", "-b", "custom", "-m", f"vlmkit:{folder}"])
    assert none.exit_code == 2 and "custom: no data given; pass --data (or custom:FILE)" in none.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "q", "conversations": [{"from": "human", "value": "Q"}]}]))
    res = CliRunner().invoke(app, ["eval", "run", "-b", f"custom:{bad}", "-m", f"vlmkit:{folder}", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{bad}: record 'q': has no assistant turn" in res.output


def test_synth_media_names_the_record_without_answer_and_points_to_custom(heldout, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    res = CliRunner().invoke(app, ["eval", "run", "-b", "synth-media", "-d", str(heldout), "-m", f"vlmkit:{folder}",
                                   "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert f"{heldout}: record 'l1' has no 'answer' field" in res.output
    assert f"-b custom:{heldout}" in res.output and "KeyError" not in res.output


@pytest.mark.parametrize("command", ["run", "score", "contamination"])
def test_help_lists_exactly_what_eval_list_lists(command):
    listed = CliRunner().invoke(app, ["eval", "list"])
    names = {line.split()[0] for line in listed.output.splitlines() if line and not line.startswith("model kinds")}
    assert names == set(BENCHMARKS.names()) and "custom" in names
    help_text = CliRunner().invoke(app, ["eval", command, "--help"], terminal_width=400).output
    flat = " ".join(help_text.split())
    listed_in_help = re.search(r"--benchmark <str> (.+?) \(`vlmkit eval list`\)", flat).group(1)
    assert set(listed_in_help.split(", ")) == names


def test_train_eval_takes_the_custom_benchmark(heldout, tiny_checkpoint):
    from vlmkit.config import TrainEvalConfig
    from vlmkit.train.heldout import HeldOutEval

    _, model = tiny_checkpoint
    check = HeldOutEval(TrainEvalConfig(benchmark="custom?metric=contains", data=str(heldout), limit=3, max_new_tokens=4))
    assert [it.id for it in check.items] == ["l1", "l2", "m1"]
    line = check.run(model)
    bench = get_benchmark("custom?metric=contains")
    answers = VlmkitBackend(model).generate([bench.request(it) for it in check.items], 4)
    assert line["overall"] == bench.score(check.items, {it.id: a.strip() for it, a in zip(check.items, answers)}).overall
    assert line["benchmark"] == "custom" and line["items"] == 3
