"""Evaluation under careless use: a cache never mixes datasets, backends score the same text
alike, an unloadable model is a clean `error:` line, and MathVista reads "(E) (b)" as E."""

from __future__ import annotations

import hashlib
import json

import pytest

from vlmkit.eval import metrics as m
from vlmkit.eval.backends import make_backend
from vlmkit.eval.benchmarks import EvalInputError, get_benchmark, read_predictions
from vlmkit.eval.runner import CACHE_NAME, META_NAME, run_benchmark
from vlmkit.eval.synth import GOLD_NAME, synth_bench


class GoldBackend:
    """Answers each item's gold answer (looked up by prompt and pixels), padded with whitespace."""

    name = "gold"

    def __init__(self, bench, items, gold, pad=""):
        self.table = {self.key(bench.prompt(it), it.load_images()): pad + gold[it.id] + pad for it in items}
        self.asked = 0

    @staticmethod
    def key(prompt, images):
        return prompt, tuple(hashlib.md5(im.tobytes()).hexdigest() for im in images)

    def generate(self, batch, max_new_tokens):
        self.asked += len(batch)
        return [self.table.get(self.key(p, ims), "no idea") for p, ims in batch]


def dataset(tmp_path, name, seed, n=6):
    d = tmp_path / name
    synth_bench("chartqa", d, n=n, seed=seed)
    bench = get_benchmark("chartqa")
    return d, bench, bench.load(d), read_predictions(d / GOLD_NAME)


def test_cache_of_another_dataset_with_the_same_ids_is_refused(tmp_path):
    d1, bench, items1, gold1 = dataset(tmp_path, "first", seed=1)
    d2, _, items2, gold2 = dataset(tmp_path, "second", seed=2)
    assert [it.id for it in items1] == [it.id for it in items2]  # the ids overlap entirely
    out = tmp_path / "out"
    run_benchmark(bench, items1, GoldBackend(bench, items1, gold1), out, model_spec="m", data_dir=str(d1), progress=False)
    run_json = (out / META_NAME).read_bytes()
    backend = GoldBackend(bench, items2, gold2)
    with pytest.raises(EvalInputError, match=r"cached predictions for 12 item\(s\).*made for different data.*another --out"):
        run_benchmark(bench, items2, backend, out, model_spec="m", data_dir=str(d2), progress=False)
    assert backend.asked == 0 and (out / META_NAME).read_bytes() == run_json  # nothing generated, nothing rewritten


def test_cache_of_the_same_data_is_reused_when_the_item_set_grows(tmp_path):
    d, bench, items, gold = dataset(tmp_path, "one", seed=1)
    out = tmp_path / "out"
    run_benchmark(bench, items[:5], GoldBackend(bench, items, gold), out, model_spec="m", progress=False)
    backend = GoldBackend(bench, items, gold)
    outcome = run_benchmark(bench, items, backend, out, model_spec="m", progress=False)
    assert (outcome.reused, outcome.generated, backend.asked) == (5, 7, 7)
    assert outcome.result.overall == 1.0


def test_a_changed_image_invalidates_its_cached_prediction(tmp_path):
    d, bench, items, gold = dataset(tmp_path, "one", seed=1)
    out = tmp_path / "out"
    run_benchmark(bench, items, GoldBackend(bench, items, gold), out, model_spec="m", progress=False)
    image = items[3].images[0]
    other = items[4].images[0]
    image.write_bytes(other.read_bytes())
    with pytest.raises(EvalInputError, match=r"for 1 item\(s\), e\.g\. 'test_human/3'"):
        run_benchmark(bench, items, GoldBackend(bench, items, gold), out, model_spec="m", progress=False)


def test_cache_without_fingerprints_is_refused(tmp_path):
    d, bench, items, gold = dataset(tmp_path, "one", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / CACHE_NAME).write_text("".join(json.dumps({"id": it.id, "prediction": "x"}) + "\n" for it in items[:2]))
    with pytest.raises(EvalInputError, match="without a fingerprint"):
        run_benchmark(bench, items, GoldBackend(bench, items, gold), out, model_spec="m", progress=False)


def test_whitespace_around_answers_is_stripped_for_every_backend(tmp_path):
    d, bench, items, gold = dataset(tmp_path, "one", seed=1)
    padded = run_benchmark(bench, items, GoldBackend(bench, items, gold, pad=" \n"), tmp_path / "a", model_spec="openai:x", progress=False)
    plain = run_benchmark(bench, items, GoldBackend(bench, items, gold), tmp_path / "b", model_spec="hf:x", progress=False)
    assert padded.result.overall == plain.result.overall == 1.0
    cached = read_predictions(tmp_path / "a" / CACHE_NAME)
    assert cached == {k: v for k, v in gold.items() if k in cached}


def test_openai_backend_answers_are_stripped_like_hf_ones(tmp_path):
    """The same raw text from the HTTP backend scores like the hf backend's."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    d, bench, items, gold = dataset(tmp_path, "one", seed=1, n=2)
    answer = {"text": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer["text"]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        it = items[0]
        answer["text"] = " " + gold[it.id] + "\n"
        backend = make_backend("openai:m", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k", client=None)
        backend._client = None  # the standard-library path, whatever is installed
        outcome = run_benchmark(bench, [it], backend, tmp_path / "o", model_spec="openai:m", progress=False)
    finally:
        server.shutdown()
    assert read_predictions(tmp_path / "o" / CACHE_NAME) == {it.id: gold[it.id]}
    assert outcome.result.overall == 1.0


def test_unloadable_hf_folder_is_an_eval_input_error(tmp_path):
    folder = tmp_path / "weird-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture-xyz"}))
    with pytest.raises(EvalInputError, match=r"weird-model: transformers cannot load this model folder"):
        make_backend(f"hf:{folder}", device="cpu")


def test_unloadable_model_ends_eval_run_with_an_error_line(tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    d, *_ = dataset(tmp_path, "one", seed=1, n=2)
    folder = tmp_path / "weird-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture-xyz"}))
    not_a_checkpoint = tmp_path / "ckpt"
    not_a_checkpoint.mkdir()
    for spec, message in ((f"hf:{folder}", "transformers cannot load this model folder"),
                          (f"vlmkit:{not_a_checkpoint}", "cannot load this vlmkit checkpoint")):
        result = CliRunner().invoke(app, ["eval", "run", "-b", "chartqa", "-d", str(d), "-m", spec, "-o", str(tmp_path / "o"),
                                          "--no-progress"])
        assert result.exit_code == 2, result.output
        assert f"error: {spec.split(':', 1)[1]}: {message}" in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("response, letter, choice", [
    ("(E) (b)", "E", "(e)"),  # an option label beats a bracketed letter that is a choice's own text
    ("(b)", "(b)", "(b)"),  # the response is a choice: the official quick rule returns it as is
    ("It is (b).", "B", "(b)"),  # only a quoted choice: that choice
    ("The answer is (C) (c).", "C", "(c)"),
    ("(a) is tempting, but (D)", "D", "(d)"),
])
def test_mathvista_option_labels_beat_choice_text(response, letter, choice):
    choices = ["(a)", "(b)", "(c)", "(d)", "(e)"]
    extracted = m.mathvista_rule_extract(response, "multi_choice", "text", choices)
    assert extracted == letter
    assert m.mathvista_normalize(extracted, choices, "multi_choice", "text", None) == choice


def test_mathvista_last_bracket_rule_unchanged_for_ordinary_choices():
    assert m.mathvista_rule_extract("(A) is wrong, so (B)", "multi_choice", "text", ["cat", "dog"]) == "B"


# ---- Round 2: duplicate ids, empty answers, unreadable files ----------------------------------
# Every benchmark file and predictions file is read through one place (base.read_json /
# read_jsonl) and every loader's items pass one check (base.checked_items).

from vlmkit.eval.runner import PredictionCache  # noqa: E402

# Where each benchmark's synthetic files keep their items, and how to give two of them one id.
DUPLICATE_ID = {
    "docvqa": ("val_v1.0.json", lambda doc: doc["data"][1].update(questionId=doc["data"][0]["questionId"])),
    "textvqa": ("TextVQA_0.5.1_val.json", lambda doc: doc["data"][1].update(question_id=doc["data"][0]["question_id"])),
    "vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json",
              lambda doc: doc["questions"][1].update(question_id=doc["questions"][0]["question_id"])),
    "mmmu": ("validation.json", lambda rows: rows[1].update(id=rows[0]["id"])),
    "mathvista": ("testmini.json", lambda doc: list(doc.values())[1].update(pid=list(doc.values())[0]["pid"])),
    "chair": ("instances_val2014.json", lambda doc: doc["images"][1].update(id=doc["images"][0]["id"])),
}

EMPTY_ANSWERS = {
    "docvqa": ("val_v1.0.json", lambda doc: doc["data"][2].update(answers=[])),
    "textvqa": ("TextVQA_0.5.1_val.json", lambda doc: doc["data"][2].update(answers=[])),
    "vqav2": ("v2_mscoco_val2014_annotations.json", lambda doc: doc["annotations"][2].update(answers=[])),
    "mmmu": ("validation.json", lambda rows: rows[2].update(answer=[])),
    "ocrbench": ("OCRBench.json", lambda rows: rows[2].update(answers=[])),
}


def synth(tmp_path, name, n=3):
    d = tmp_path / name
    synth_bench(name, d, n=n, seed=0)
    return d


def rewrite(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("name", sorted(DUPLICATE_ID))
def test_duplicate_ids_in_a_benchmark_file_are_refused(tmp_path, name):
    d = synth(tmp_path, name)
    file, change = DUPLICATE_ID[name]
    path = next(d.rglob(file))
    rewrite(path, change)
    with pytest.raises(EvalInputError, match=rf"{path}: 1 duplicate item id\(s\): '[^']+'.*each item needs its own id"):
        get_benchmark(name).load(d)


def test_duplicate_docvqa_question_id_no_longer_scores_gold_below_one(tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    d = synth(tmp_path, "docvqa", n=6)
    path = d / "val_v1.0.json"
    doc = json.loads(path.read_text())
    qid = doc["data"][0]["questionId"]
    doc["data"][1]["questionId"] = qid  # gold predictions scored 0.8333 (5/6) before
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["eval", "score", "-b", "docvqa", "-d", str(d), "-p", str(d / GOLD_NAME)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {path}: 1 duplicate item id(s): '{qid}'; each item needs its own id"]


def test_duplicate_keys_in_an_id_keyed_file_are_refused(tmp_path):
    """JSON keeps the last of two equal keys: MMMU's answer dict would lose an item unnoticed."""
    d = synth(tmp_path, "mmmu")
    (d / "validation.json").unlink()
    path = d / "answer_dict_val.json"
    text = path.read_text()
    first = text.index('"validation_')
    entry = text[first : text.index("}", first) + 1]
    path.write_text(text.replace(entry, entry + ", " + entry, 1))
    with pytest.raises(EvalInputError, match=rf"{path}: key 'validation_\w+' appears twice in one object"):
        get_benchmark("mmmu").load(d)


def test_eval_run_refuses_duplicate_item_ids_before_generating(tmp_path):
    d, bench, items, gold = dataset(tmp_path, "one", seed=1, n=2)
    twin = type(items[1])(**{**items[1].__dict__, "id": items[0].id})
    backend = GoldBackend(bench, items, gold)
    with pytest.raises(EvalInputError, match=rf"1 duplicate item id\(s\) in the chartqa items, e\.g\. '{items[0].id}'"):
        run_benchmark(bench, [items[0], twin], backend, tmp_path / "o", model_spec="m", progress=False)
    assert backend.asked == 0 and not (tmp_path / "o").exists()


def test_duplicate_prediction_ids_name_both_lines(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 7, "prediction": "a"}\n{"id": 8, "prediction": "b"}\n\n{"id": "7", "prediction": "c"}\n')
    with pytest.raises(EvalInputError, match=rf"{path}:4: id '7' appears twice \(first on line 1\)"):
        read_predictions(path)


@pytest.mark.parametrize("name", sorted(EMPTY_ANSWERS))
def test_empty_answers_list_is_refused(tmp_path, name):
    d = synth(tmp_path, name)
    file, change = EMPTY_ANSWERS[name]
    path = next(d.rglob(file))
    rewrite(path, change)
    where = next(d.rglob(DUPLICATE_ID[name][0])) if name == "vqav2" else path  # items come from the questions
    with pytest.raises(EvalInputError, match=rf"{where}: item '[^']+' has an empty answers list"):
        get_benchmark(name).load(d)


def test_chair_image_without_objects_is_still_a_question(tmp_path):
    d = synth(tmp_path, "chair")
    path = d / "instances_val2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    path.write_text(json.dumps(doc))
    items = get_benchmark("chair").load(d)
    assert [it.answers for it in items if it.id == str(doc["images"][0]["id"])] == [[]]


UNREADABLE = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "a binary file, not JSON text"),
    "not UTF-8": ('{"data": [{"question": "caf\xe9"}]}'.encode("latin-1"), r"not UTF-8 text \(byte \d+ is b'\\xe9'\)"),
    "100k-deep nesting": (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read"),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_benchmark_file_names_the_file(tmp_path, kind):
    data, message = UNREADABLE[kind]
    for name, file in (("docvqa", "val_v1.0.json"), ("mmmu", "answer_dict_val.json"), ("chartqa", "test/test_human.json"),
                       ("vqav2", "v2_mscoco_val2014_annotations.json"), ("mathvista", "testmini.json")):
        d = synth(tmp_path, name)
        if name == "mmmu":
            (d / "validation.json").unlink()
        path = d / file
        path.write_bytes(data)
        with pytest.raises(EvalInputError, match=rf"^{path}: {message}"):
            get_benchmark(name).load(d)


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_predictions_and_cache_files_name_the_file(tmp_path, kind):
    data, _ = UNREADABLE[kind]
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"id": "1", "prediction": "a"}\n' + data + b"\n")
    # A binary file splits into "lines" of its own; what matters is that the file and line are named.
    with pytest.raises(EvalInputError, match=rf"^{path}:2: (not UTF-8 text|a binary file|JSON nested too deeply)"):
        read_predictions(path)
    with pytest.raises(EvalInputError, match=rf"^{path}:2: malformed cache line"):
        PredictionCache(path).load()


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_file_ends_eval_score_with_one_error_line(tmp_path, kind):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    data, _ = UNREADABLE[kind]
    d = synth(tmp_path, "docvqa")
    for target in (d / "val_v1.0.json", d / GOLD_NAME):
        original = target.read_bytes()
        target.write_bytes(data)
        result = CliRunner().invoke(app, ["eval", "score", "-b", "docvqa", "-d", str(d), "-p", str(d / GOLD_NAME)])
        target.write_bytes(original)
        assert result.exit_code == 2 and "Traceback" not in result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {target}"), result.output


def test_synth_qa_duplicate_ids_and_unreadable_file_are_refused(tmp_path):
    rec = {"id": "q1", "image": "a.png", "task": "text", "answer": "cat",
           "conversations": [{"from": "human", "value": "<image>\nWhat word is written?"}]}
    path = tmp_path / "test.json"
    path.write_text(json.dumps([rec, {**rec, "answer": "dog"}]))
    with pytest.raises(EvalInputError, match=rf"{path}: 1 duplicate item id\(s\): 'q1'"):
        get_benchmark("synth-qa").load(tmp_path)
    path.write_bytes(b"[" * 100_000)
    with pytest.raises(EvalInputError, match=rf"{path}: JSON nested too deeply"):
        get_benchmark("synth-qa").load(tmp_path)
