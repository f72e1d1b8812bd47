"""`eval run` machinery: batching, resumable cache, results files, backends over HTTP."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlmkit.eval.backends import BACKENDS, OpenAIChatBackend, make_backend, register_backend
from vlmkit.eval.benchmarks import EvalInputError, get_benchmark, read_predictions
from vlmkit.eval.runner import CACHE_NAME, PredictionCache, run_benchmark
from vlmkit.eval.synth import GOLD_NAME, synth_bench


def _key(prompt, images):
    return prompt, tuple(hashlib.md5(im.tobytes()).hexdigest() for im in images)


class FakeBackend:
    """Answers gold for a known (prompt, image pixels) pair; can die after some batches."""

    name = "fake"

    def __init__(self, bench, items, gold, wrong_every=0, fail_after_batches=None):
        self.table = {}
        for i, it in enumerate(items):
            ans = gold[it.id]
            if wrong_every and i % wrong_every == 0:
                ans = "zzz"  # some wrong answers so the score is not trivially 1.0
            self.table[_key(bench.prompt(it), it.load_images())] = ans
        self.fail_after = fail_after_batches
        self.calls = []

    def generate(self, batch, max_new_tokens):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed mid-run")
        self.calls.append(len(batch))
        return [self.table[_key(p, ims)] for p, ims in batch]


@pytest.fixture
def chartqa(tmp_path):
    d = tmp_path / "chartqa"
    synth_bench("chartqa", d, n=7)
    bench = get_benchmark("chartqa")
    items = bench.load(d)
    return d, bench, items, read_predictions(d / GOLD_NAME)


def test_resume_after_kill_gives_same_score_without_redoing_work(chartqa, tmp_path):
    d, bench, items, gold = chartqa
    full = run_benchmark(bench, items, FakeBackend(bench, items, gold, wrong_every=3), tmp_path / "full",
                         model_spec="fake", batch_size=4, progress=False)
    assert full.generated == 14 and 0 < full.result.overall < 1

    out = tmp_path / "killed"
    dying = FakeBackend(bench, items, gold, wrong_every=3, fail_after_batches=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_benchmark(bench, items, dying, out, model_spec="fake", batch_size=4, progress=False)
    assert len(read_predictions(out / CACHE_NAME)) == 8  # both finished batches survived

    again = FakeBackend(bench, items, gold, wrong_every=3)
    resumed = run_benchmark(bench, items, again, out, model_spec="fake", batch_size=4, progress=False)
    assert sum(again.calls) == 6 and resumed.reused == 8 and resumed.generated == 6
    assert resumed.result.overall == full.result.overall
    assert resumed.result.per_item == full.result.per_item
    lines = (out / CACHE_NAME).read_text().splitlines()
    assert len(lines) == 14 and len({json.loads(x)["id"] for x in lines}) == 14

    # A finished run answers everything from the cache.
    idle = FakeBackend(bench, items, gold)
    assert run_benchmark(bench, items, idle, out, model_spec="fake", progress=False).generated == 0 and not idle.calls


def test_results_files_record_prompt_parser_metric(chartqa, tmp_path):
    d, bench, items, gold = chartqa
    out = run_benchmark(bench, items, FakeBackend(bench, items, gold), tmp_path / "o", model_spec="fake",
                        data_dir=str(d), batch_size=5, progress=False)
    res = json.loads((out.out_dir / "results.json").read_text())
    assert res["overall"] == 1.0 and res["benchmark"] == "chartqa" and res["model"] == "fake"
    assert res["prompt_template"] == bench.prompt_template and res["parser"] == bench.parser
    assert res["metric"] == bench.metric and set(res["breakdown"]) == {"test_human", "test_augmented"}
    md = (out.out_dir / "results.md").read_text()
    assert "| chartqa | 100.00 |" in md and "relaxed" in md and "Answer the question using a single word" in md
    assert (out.out_dir / "metrics.jsonl").read_text().count("\n") == 1
    # The cache is a valid predictions file for `eval score`.
    assert bench.score(items, read_predictions(out.out_dir / CACHE_NAME)).overall == 1.0


def test_cache_from_another_run_is_refused(chartqa, tmp_path):
    d, bench, items, gold = chartqa
    run_benchmark(bench, items[:2], FakeBackend(bench, items, gold), tmp_path / "o", model_spec="a", progress=False)
    with pytest.raises(EvalInputError, match="different run"):
        run_benchmark(bench, items, FakeBackend(bench, items, gold), tmp_path / "o", model_spec="b", progress=False)


def test_torn_and_malformed_cache_lines(tmp_path):
    cache = PredictionCache(tmp_path / CACHE_NAME)
    cache.append([("a", "1"), ("b", "2")])
    with open(cache.path, "ab") as f:
        f.write(b'{"id": "c", "predic')  # a write cut short by a kill
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert cache.load() == {"a": "1", "b": "2"}
    cache.append([("c", "3")])
    assert cache.load() == {"a": "1", "b": "2", "c": "3"}
    with open(cache.path, "ab") as f:
        f.write(b'{"id": "d", "prediction": "4"}')  # complete record, newline lost
    assert cache.load()["d"] == "4" and cache.path.read_bytes().endswith(b"\n")
    before = cache.path.read_bytes()
    cache.path.write_bytes(before.replace(b'"b"', b"b", 1))
    with pytest.raises(EvalInputError, match=f"{CACHE_NAME}:2: malformed"):
        cache.load()
    assert cache.path.read_bytes() == before.replace(b'"b"', b"b", 1)  # nothing dropped


def test_missing_image_names_item_and_keeps_cache(chartqa, tmp_path):
    d, bench, items, gold = chartqa
    backend = FakeBackend(bench, items, gold)
    (d / "test" / "png" / items[5].metadata["imgname"]).unlink()
    with pytest.raises(EvalInputError, match=r"item test_human/5: .*not found"):
        run_benchmark(bench, items, backend, tmp_path / "o", model_spec="fake", batch_size=2, progress=False)
    assert len(read_predictions(tmp_path / "o" / CACHE_NAME)) == 4


def test_backend_registry_hook():
    with pytest.raises(EvalInputError, match="/nowhere: vlmkit checkpoint folder not found"):
        make_backend("vlmkit:/nowhere")
    with pytest.raises(EvalInputError, match="unknown model spec"):
        make_backend("nosuchkind:/x")

    @register_backend("test-echo")
    def _factory(target, **opts):
        class Echo:
            name = f"echo:{target}"

            def generate(self, batch, max_new_tokens):
                return [p[:max_new_tokens] for p, _ in batch]

        return Echo()

    try:
        assert make_backend("test-echo:x").generate([("hello", [])], 3) == ["hel"]
    finally:
        BACKENDS.pop("test-echo")


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, body))
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        n_img = sum(p["type"] == "image_url" for p in parts)
        reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": f"{n_img}|{text[:10]}"}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _ChatHandler.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("client", ["urllib", "openai"])
def test_openai_compatible_backend(chat_server, chartqa, tmp_path, client):
    if client == "openai":
        pytest.importorskip("openai")
    d, bench, items, gold = chartqa
    backend = OpenAIChatBackend("tiny-vlm", base_url=chat_server, api_key="k", client=client, concurrency=4)
    out = run_benchmark(bench, items[:5], backend, tmp_path / client, model_spec="openai:tiny-vlm", batch_size=5,
                        progress=False)
    preds = read_predictions(out.out_dir / CACHE_NAME)
    assert preds[items[0].id] == "1|" + bench.prompt(items[0])[:10]  # order kept across concurrent requests
    assert all(p.startswith("1|") for p in preds.values())
    path, body = _ChatHandler.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-vlm" and body["temperature"] == 0.0
    assert body["max_tokens"] == bench.default_max_new_tokens
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
