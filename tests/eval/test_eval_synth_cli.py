"""Synthetic benchmarks round-trip through the real loaders and the `vlmkit eval` commands."""

import json

import pytest
import typer
from typer.testing import CliRunner

from vlmkit.commands import evaluate
from vlmkit.eval.benchmarks import get_benchmark, read_predictions
from vlmkit.eval.synth import GOLD_NAME, SYNTHESIZERS, synth_bench


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def _root():  # a callback keeps `eval`/`data` as named groups
        pass

    evaluate.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name in SYNTHESIZERS:
        synth_bench(name, root / name, n=8)
    return root


@pytest.mark.parametrize("name", sorted(SYNTHESIZERS))
def test_gold_round_trip(name, synth_root, cli):
    d = synth_root / name
    b = get_benchmark(name)
    items = b.load(d)
    for it in items:
        assert it.images and all(img.size[0] > 0 for img in it.load_images())
        assert b.prompt(it)
    res = cli("eval", "score", "--benchmark", name, "--data", d, "--predictions", d / GOLD_NAME, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["n_missing"] == 0
    if name == "chair":
        assert out["overall"] == 0.0 and out["breakdown"]["CHAIRi"] == 0.0 and out["breakdown"]["recall"] == 1.0
    else:
        assert out["overall"] == 1.0, out
    assert {"overall", "display", "breakdown", "metric", "parser"} <= set(out)


def test_chartqa_ids_and_splits(synth_root):
    items = get_benchmark("chartqa").load(synth_root / "chartqa")
    assert items[0].id == "test_human/0" and items[-1].id == "test_augmented/7"


def test_mmmu_parquet_layout(synth_root, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    src = synth_root / "mmmu"
    rows = json.loads((src / "validation.json").read_text())
    for r in rows:  # the Hugging Face release embeds images as {"bytes", "path"}
        r["image_1"] = {"bytes": (src / r["image_1"]).read_bytes(), "path": None}
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subfield"], []).append(r)
    for subject, rs in by_subject.items():
        (tmp_path / subject).mkdir()
        pd.DataFrame(rs).to_parquet(tmp_path / subject / "validation-00000-of-00001.parquet")
    b = get_benchmark("mmmu")
    items = b.load(tmp_path)
    assert len(items) == len(rows) and isinstance(items[0].images[0], bytes)
    assert items[0].load_images()[0].mode == "RGB"
    assert b.score(items, read_predictions(src / GOLD_NAME)).overall == 1.0
    assert "(A) " in b.prompt(next(it for it in items if it.metadata["question_type"] == "multiple-choice"))


def test_score_text_output_and_errors(synth_root, tmp_path, cli):
    d = synth_root / "ocrbench"
    res = cli("eval", "score", "-b", "ocrbench", "-d", d, "-p", d / GOLD_NAME)
    assert res.exit_code == 0 and "ocrbench: 10/10" in res.output and "points Text Recognition: 6" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "prediction": "x"}\n{"id": 1, "prediction": \n')
    res = cli("eval", "score", "-b", "ocrbench", "-d", d, "-p", bad)
    assert res.exit_code == 2 and "bad.jsonl:2: not valid JSON" in res.output
    bad.write_text('{"id": 0, "prediction": 3}\n')
    res = cli("eval", "score", "-b", "ocrbench", "-d", d, "-p", bad)
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output and "must be a string" in res.output
    bad.write_text('{"id": 0, "prediction": "a"}\n{"id": "0", "prediction": "b"}\n')
    assert "appears twice" in cli("eval", "score", "-b", "ocrbench", "-d", d, "-p", bad).output
    res = cli("eval", "score", "-b", "nope", "-d", d, "-p", bad)
    assert res.exit_code == 2 and "unknown benchmark 'nope'" in res.output
    res = cli("eval", "score", "-b", "docvqa", "-d", d, "-p", bad)
    assert res.exit_code == 2 and "val_v1.0.json" in res.output


def test_synth_bench_command(tmp_path, cli):
    res = cli("data", "synth-bench", "docvqa", tmp_path / "dv", "--n", "3")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "dv" / "val_v1.0.json").is_file() and len(list((tmp_path / "dv" / "documents").glob("*.png"))) == 3
    assert "unknown" not in res.output
    res = cli("data", "synth-bench", "nope", tmp_path / "x")
    assert res.exit_code == 2 and "no synthetic version" in res.output


def test_contamination(synth_root, tmp_path, cli):
    d = synth_root / "docvqa"
    items = get_benchmark("docvqa").load(d)
    leaked = items[0]
    train = [
        {"id": "a", "image": "x.png", "conversations": [
            {"from": "human", "value": f"<image>\n{leaked.question}"}, {"from": "gpt", "value": leaked.answers[0]}]},
        {"id": "b", "image": "y.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "A cat."}]},
    ]
    tf = tmp_path / "train.json"
    tf.write_text(json.dumps(train))
    res = cli("eval", "contamination", "--train", tf, "-b", "docvqa", "-d", d, "--n", "4", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["n_train_texts"] == 4 and rep["n_contaminated"] >= 1
    assert rep["examples"][0]["overlap"] == 1.0
    # Every item sharing the leaked question text is caught; the others are not.
    same = [it.id for it in items if it.question == leaked.question and it.answers[0] in leaked.answers]
    assert {e["id"] for e in rep["examples"] if e["overlap"] == 1.0} == set(same)
    tf.write_text('{"not": "a list"}')
    res = cli("eval", "contamination", "--train", tf, "-b", "docvqa", "-d", d)
    assert res.exit_code == 2 and "LLaVA" in res.output
