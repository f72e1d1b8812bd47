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
