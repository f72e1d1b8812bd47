"""`vlmkit eval prepare`: small parquet files in the layout of the Hugging Face copies lmms-eval
reads, converted through the CLI, then read back by each benchmark's own loader and scored."""

import inspect
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from vlmkit.commands import evaluate
from vlmkit.eval.benchmarks import get_benchmark
from vlmkit.eval.prepare import PREPARED_MARKER, PREPARERS
from vlmkit.eval.synth import text_image


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    evaluate.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def png(text: str, size=(160, 48)) -> dict:
    buf = io.BytesIO()
    text_image(text, size=size, font_size=20).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{text}.png"}


def write_parquet(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# Each case: the shard's path inside the copy, its rows (the copy's column names), and what the
# loader must read back: {item id: (question, answers, the text drawn in its image)}.
CASES = {
    "chartqa": ("data/test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "What is the value of Pears?", "answer": "42", "image": png("c0")},
        {"type": "augmented_test", "question": "Which bar is highest?", "answer": "Plums", "image": png("c1")},
        {"type": "human_test", "question": "How many bars?", "answer": "3", "image": png("c2")},
    ], {"test_human/0": ("What is the value of Pears?", ["42"], "c0"),
        "test_human/1": ("How many bars?", ["3"], "c2"),
        "test_augmented/0": ("Which bar is highest?", ["Plums"], "c1")}),
    "docvqa": ("DocVQA/validation-00000-of-00001.parquet", [
        {"questionId": "49153", "question": "What is the date?", "question_types": ["layout"], "image": png("d0"),
         "docId": 14465, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
         "answers": ["1/8/93", "1/8/1993"], "data_split": "val"},
        {"questionId": "24580", "question": "What is the total?", "question_types": ["form", "table/list"],
         "image": png("d0"), "docId": 14465, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
         "answers": ["$12.50"], "data_split": "val"},
    ], {"49153": ("What is the date?", ["1/8/93", "1/8/1993"], "d0"), "24580": ("What is the total?", ["$12.50"], "d0")}),
    "ocrbench": ("data/test-00000-of-00001.parquet", [
        {"dataset": "IIIT5K", "question": "what is written in the image?", "question_type": "Regular Text Recognition",
         "answer": ["CENTRE"], "image": png("o0")},
        {"dataset": "HME100k", "question": "Write the formula in LaTeX.",
         "question_type": "Handwritten Mathematical Expression Recognition", "answer": ["x ^ { 2 } + 1"], "image": png("o1")},
    ], {"0": ("what is written in the image?", ["CENTRE"], "o0"), "1": ("Write the formula in LaTeX.", ["x ^ { 2 } + 1"], "o1")}),
    "textvqa": ("data/validation-00000-of-00001.parquet", [
        {"question_id": 34602, "question": "what does the sign say?", "image_id": "003a8ae2ef43b901",
         "answers": ["stop"] * 10, "image_classes": ["Sign"], "set_name": "val", "image": png("t0")},
        {"question_id": 34603, "question": "what brand?", "image_id": "00b1f9a3c4d5e6f7",
         "answers": ["nokia"] * 8 + ["nokia."] * 2, "image_classes": ["Phone"], "set_name": "val", "image": png("t1")},
    ], {"34602": ("what does the sign say?", ["stop"] * 10, "t0"),
        "34603": ("what brand?", ["nokia"] * 8 + ["nokia."] * 2, "t1")}),
    "vqav2": ("data/validation-00000-of-00001.parquet", [
        {"question_type": "how many", "multiple_choice_answer": "2", "image_id": 262148, "answer_type": "number",
         "question_id": 262148000, "question": "How many dogs?", "image": png("v0"),
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]},
        {"question_type": "is there", "multiple_choice_answer": "yes", "image_id": 393225, "answer_type": "yes/no",
         "question_id": 393225001, "question": "Is there a cat?", "image": png("v1"),
         "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]},
    ], {"262148000": ("How many dogs?", ["2"] * 10, "v0"), "393225001": ("Is there a cat?", ["yes"] * 10, "v1")}),
    "mathvista": ("data/testmini-00000-of-00001.parquet", [
        {"pid": "1", "question": "Which fruit sold the most?", "image": "images/1.jpg", "decoded_image": png("m0"),
         "choices": ["Apples", "Pears", "Plums"], "unit": None, "precision": None, "answer": "Pears",
         "question_type": "multi_choice", "answer_type": "text", "query": "Hint: ...",
         "metadata": {"split": "testmini", "source": "synth", "task": "figure question answering",
                      "category": "math-targeted-vqa", "context": "bar chart", "grade": "elementary school",
                      "skills": ["statistical reasoning"], "language": "english", "img_width": 160, "img_height": 48}},
        {"pid": "2", "question": "How many bars?", "image": "images/2.jpg", "decoded_image": png("m1"),
         "choices": None, "unit": None, "precision": None, "answer": "3",
         "question_type": "free_form", "answer_type": "integer", "query": "Hint: ...",
         "metadata": {"split": "testmini", "source": "synth", "task": "figure question answering",
                      "category": "math-targeted-vqa", "context": "bar chart", "grade": "elementary school",
                      "skills": ["arithmetic reasoning"], "language": "english", "img_width": 160, "img_height": 48}},
    ], {"1": ("Which fruit sold the most?", ["Pears"], "m0"), "2": ("How many bars?", ["3"], "m1")}),
    "mmmu": ("Art/validation-00000-of-00001.parquet", [
        {"id": "validation_Art_1", "question": "Which word is written in <image 1>?", "options": "['OCEAN', 'RIVER', 'FOREST']",
         "explanation": "", "image_1": png("a0"), "image_2": None, "img_type": "['Text']", "answer": "B",
         "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "Art"},
    ], {"validation_Art_1": ("Which word is written in <image 1>?", ["B"], "a0")}),
    "pope": ("data/test-00000-of-00003.parquet", [
        {"id": "0", "question_id": "1", "question": "Is there a snowboard in the image?", "answer": "yes",
         "image_source": "COCO_val2014_000000310196", "image": png("p0"), "category": "adversarial"},
        {"id": "1", "question_id": "1", "question": "Is there a dog in the image?", "answer": "no",
         "image_source": "COCO_val2014_000000310196", "image": png("p0"), "category": "random"},
        {"id": "2", "question_id": "2", "question": "Is there a car in the image?", "answer": "no",
         "image_source": "COCO_val2014_000000210789", "image": png("p1"), "category": "random"},
    ], {"adversarial/1": ("Is there a snowboard in the image?", ["yes"], "p0"),
        "random/1": ("Is there a dog in the image?", ["no"], "p0"),
        "random/2": ("Is there a car in the image?", ["no"], "p1")}),
    "mme": ("data/test-00000-of-00004.parquet", [
        {"question_id": "artwork/10002.jpg", "question": "Is this artwork created by Giotto? Please answer yes or no.",
         "answer": "Yes", "category": "artwork", "image": png("e0")},
        {"question_id": "artwork/10002.jpg", "question": "Is this artwork created by Monet? Please answer yes or no.",
         "answer": "No", "category": "artwork", "image": png("e0")},
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 3? Please answer yes or no.",
         "answer": "No", "category": "code_reasoning", "image": png("e1")},
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 5? Please answer yes or no.",
         "answer": "Yes", "category": "code_reasoning", "image": png("e1")},
    ], {"artwork/10002.jpg#0": ("Is this artwork created by Giotto? Please answer yes or no.", ["Yes"], "e0"),
        "artwork/10002.jpg#1": ("Is this artwork created by Monet? Please answer yes or no.", ["No"], "e0"),
        "code_reasoning/0020.png#0": ("Is the output 3? Please answer yes or no.", ["No"], "e1"),
        "code_reasoning/0020.png#1": ("Is the output 5? Please answer yes or no.", ["Yes"], "e1")}),
    "hallusionbench": ("data/image-00000-of-00001.parquet", [
        {"category": "VS", "subcategory": "chart", "visual_input": "1", "set_id": "0", "figure_id": "1",
         "sample_note": "import", "question_id": "0", "question": "Is Switzerland the leading importer?",
         "gt_answer_details": "", "gt_answer": "1", "filename": "./VS/chart/0_1.png", "image": png("h0")},
        {"category": "VD", "subcategory": "ocr", "visual_input": "1", "set_id": "2", "figure_id": "0",
         "sample_note": "", "question_id": "1", "question": "Does the sign say STOP?",
         "gt_answer_details": "", "gt_answer": "0", "filename": "./VD/ocr/2_0.png", "image": png("h1")},
    ], {"VS_chart_0_1_0": ("Is Switzerland the leading importer?", ["Yes"], "h0"),
        "VD_ocr_2_0_1": ("Does the sign say STOP?", ["No"], "h1")}),
    "mmbench": ("en/dev-00000-of-00001.parquet", [
        {"index": 241, "question": "Which word is shown?", "hint": None, "A": "cat", "B": "dog", "C": "owl", "D": None,
         "answer": "B", "category": "ocr", "image": png("b0"), "source": "synth", "L2-category": "finegrained_perception (instance-level)",
         "comment": None, "split": "dev"},
        {"index": 1000241, "question": "Which word is shown?", "hint": None, "A": "dog", "B": "owl", "C": "cat", "D": None,
         "answer": "A", "category": "ocr", "image": png("b0"), "source": "synth", "L2-category": "finegrained_perception (instance-level)",
         "comment": None, "split": "dev"},
    ], {"241": ("Which word is shown?", ["B"], "b0"), "1000241": ("Which word is shown?", ["A"], "b0")}),
}


def test_hallusionbench_reads_the_non_image_split_too(tmp_path, cli):
    """The copy splits the questions asked with and without a figure; both make the question file."""
    shard, rows, expected = CASES["hallusionbench"]
    write_parquet(tmp_path / "hf" / shard, rows)
    blind = {**rows[0], "visual_input": "0", "figure_id": "0", "filename": None, "image": None}
    write_parquet(tmp_path / "hf" / "data" / "non_image-00000-of-00001.parquet", [blind])
    r = cli("eval", "prepare", "hallusionbench", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    items = {it.id: it for it in get_benchmark("hallusionbench").load(tmp_path / "out")}
    assert sorted(items) == sorted([*expected, "VS_chart_0_0_0"]) and items["VS_chart_0_0_0"].images == []
    assert "note:" not in r.output
    # Without that split the questions asked with a figure are still converted, and the output says what is missing.
    (tmp_path / "hf" / "data" / "non_image-00000-of-00001.parquet").unlink()
    r = cli("eval", "prepare", "hallusionbench", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0 and "no shard of split 'non_image'" in r.output
    assert sorted(it.id for it in get_benchmark("hallusionbench").load(tmp_path / "out")) == sorted(expected)


def test_a_file_name_outside_the_folder_is_refused(tmp_path, cli):
    shard, rows, _ = CASES["hallusionbench"]
    write_parquet(tmp_path / "hf" / shard, [{**rows[0], "filename": "../../escape.png"}])
    r = cli("eval", "prepare", "hallusionbench", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 2 and "column 'filename'" in r.output and "not a relative file name" in r.output
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out").exists()


def test_every_preparer_is_tested():
    assert sorted(CASES) == sorted(PREPARERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepare_round_trip(name, tmp_path, cli):
    shard, rows, expected = CASES[name]
    write_parquet(tmp_path / "hf" / shard, rows)
    folder, _, file_name = shard.rpartition("/")
    other = f"{folder}/train-{file_name.partition('-')[2]}"
    assert other != shard
    write_parquet(tmp_path / "hf" / other, rows[:1])  # another split in the same copy: left out
    out = tmp_path / "official"
    r = cli("eval", "prepare", name, tmp_path / "hf", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"{len(rows)} items" in r.output
    items = {it.id: it for it in get_benchmark(name).load(out)}
    assert sorted(items) == sorted(expected)
    for item_id, (question, answers, drawn) in expected.items():
        it = items[item_id]
        assert it.question == question and it.answers == answers
        got = it.load_images()[0].convert("RGB")
        want = Image.open(io.BytesIO(png(drawn)["bytes"])).convert("RGB")
        assert got.size == want.size and got.tobytes() == want.tobytes()
    preds = out.parent / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": a[0]}) + "\n" for k, (_, a, _) in expected.items()))
    r = cli("eval", "score", "-b", name, "-d", out, "-p", preds, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["overall"] == 1.0
    assert json.loads((out / PREPARED_MARKER).read_text())["items"] == len(rows)
    # Preparing again replaces an earlier output.
    r = cli("eval", "prepare", name, tmp_path / "hf" / shard, out, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["items"] == len(rows)


def test_missing_column_names_shard_and_column(tmp_path, cli):
    shard = tmp_path / "hf" / "data" / "test-00000-of-00001.parquet"
    write_parquet(shard, [{"type": "human_test", "question": "q?", "image": png("x")}])
    r = cli("eval", "prepare", "chartqa", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    assert str(shard) in r.output and "'answer'" in r.output
    assert not (tmp_path / "out").exists()


def test_undecodable_image_names_shard_row_and_column(tmp_path, cli):
    shard = tmp_path / "hf" / "data" / "test-00000-of-00001.parquet"
    rows = [{"dataset": "IIIT5K", "question": "q", "question_type": "Regular Text Recognition", "answer": ["A"],
             "image": png("ok")},
            {"dataset": "IIIT5K", "question": "q", "question_type": "Regular Text Recognition", "answer": ["B"],
             "image": {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "bad.png"}}]
    write_parquet(shard, rows)
    r = cli("eval", "prepare", "ocrbench", shard, tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    assert f"{shard}: row 1, column 'image'" in r.output and "not a decodable image" in r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_unrelated_target_is_refused_and_kept(tmp_path, cli):
    write_parquet(tmp_path / "hf" / "data" / "test-00000-of-00001.parquet",
                  [{"type": "human_test", "question": "q?", "answer": "1", "image": png("x")}])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = cli("eval", "prepare", "chartqa", tmp_path / "hf", out, "--no-progress")
    assert r.exit_code == 2 and "not an earlier `vlmkit eval prepare` output" in r.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_benchmark_lists_the_known(tmp_path, cli):
    r = cli("eval", "prepare", "chair", tmp_path, tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    assert "cannot prepare 'chair'" in r.output and "chartqa, docvqa" in r.output


def test_wrong_split_names_what_was_found(tmp_path, cli):
    write_parquet(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet",
                  [{"type": "human_test", "question": "q?", "answer": "1", "image": png("x")}])
    r = cli("eval", "prepare", "chartqa", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 2
    assert "no parquet shard of split 'test'" in r.output and "train-00000-of-00001.parquet" in r.output


def test_docvqa_reads_only_its_config(tmp_path, cli):
    """lmms-lab/DocVQA holds DocVQA and InfographicVQA side by side; given the whole copy, only the
    DocVQA config is converted."""
    shard, rows, expected = CASES["docvqa"]
    write_parquet(tmp_path / "hf" / shard, rows)
    infographic = [{**rows[0], "questionId": "99999", "image": png("info")}]
    write_parquet(tmp_path / "hf" / "InfographicVQA" / "validation-00000-of-00001.parquet", infographic)
    r = cli("eval", "prepare", "docvqa", tmp_path / "hf", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sorted(it.id for it in get_benchmark("docvqa").load(tmp_path / "out")) == sorted(expected)


def test_help_lists_what_it_prepares_and_progress_counts_rows(tmp_path, cli):
    names = sorted(PREPARERS)
    help_text = inspect.signature(evaluate.prepare_cmd).parameters["benchmark"].default.help
    assert help_text == ", ".join(names[:-1]) + " or " + names[-1]
    shard, rows, _ = CASES["chartqa"]
    write_parquet(tmp_path / "hf" / shard, rows)
    r = cli("eval", "prepare", "chartqa", tmp_path / "hf", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert f"{len(rows)}/{len(rows)}" in r.output  # tqdm's row count
