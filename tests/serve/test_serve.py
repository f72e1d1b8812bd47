"""The OpenAI-compatible server, driven by the official `openai` client over real loopback HTTP."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_util import png_data_uri, request, running_server, tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from vlmkit.data.formats import Message  # noqa: E402
from vlmkit.generate import GenerationConfig, generate  # noqa: E402
from vlmkit.serve.app import ServerSettings, TextAssembler, create_app  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_request_bytes=200_000, max_image_pixels=100_000,
                              max_tokens_limit=64, max_batch=32, max_wait_ms=20)
    app = create_app(model, processor, settings)
    with running_server(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected_text(tiny, question: str, image_uri: str | None, max_tokens: int) -> str:
    """What vlmkit's own batched generate answers for the same conversation."""
    from vlmkit.processing.images import load_image

    model, processor = tiny
    images = [load_image(base64.b64decode(image_uri.split(",", 1)[1]))] if image_uri else []
    text = ("<image>\n" if image_uri else "") + question
    prompt = processor.encode_prompt([Message("user", text)], images)
    tokens = generate(model, [prompt], GenerationConfig(max_new_tokens=max_tokens))[0]
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def user(question: str, image_uri: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}] if image_uri else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def test_chat_completion_matches_vlmkit_generate(tiny, client):
    uri = png_data_uri()
    resp = client.chat.completions.create(model=MODEL, messages=user("What colour?", uri), max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(tiny, "What colour?", uri, 12)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > tiny[0].tokens_per_image
    assert resp.model == MODEL and resp.id.startswith("chatcmpl-")


def test_compiled_decode_server_answers_like_the_eager_one(tiny):
    model, processor = tiny
    app = create_app(model, processor, ServerSettings(model_name=MODEL, compile_decode=True))
    uri = png_data_uri((20, 200, 90))
    with running_server(app) as base:
        compiled_client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        resp = compiled_client.chat.completions.create(model=MODEL, messages=user("What colour?", uri), max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == expected_text(tiny, "What colour?", uri, 12)


def test_text_only_and_system_message(tiny, client):
    resp = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=5,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert isinstance(resp.choices[0].message.content, str)


def test_streaming_equals_non_streaming(client):
    uri = png_data_uri((10, 200, 10))
    whole = client.chat.completions.create(model=MODEL, messages=user("Describe.", uri), max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=user("Describe.", uri), max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage, roles = [], [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert roles[0] == "assistant"
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_framing(server):
    base, _ = server
    status, payload, headers = request(base, "POST", "/v1/chat/completions", {"model": MODEL, "messages": user("x"), "max_tokens": 3, "stream": True},
                                       {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in payload.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_models_health_and_page(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body, _ = request(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, html, headers = request(base, "GET", "/")
    assert status == 200 and 'id="question"' in html and "Content-Security-Policy" in {k.title(): v for k, v in headers.items()}


def test_wrong_or_missing_api_key(server):
    base, _ = server
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body, headers = request(base, "POST", "/v1/chat/completions", {"model": MODEL, "messages": user("hi")})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert request(base, "GET", "/health")[0] == 200  # health stays open for probes


def _big_png_uri(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


GOOD = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}

MALFORMED = {
    "bad json": "{not json",
    "not an object": "[1, 2]",
    "not utf-8": b"\xff\xfe\x00",
    "no messages": {"model": MODEL},
    "empty messages": {"model": MODEL, "messages": []},
    "no model": {"messages": user("hi")},
    "unknown role": {**GOOD, "messages": [{"role": "robot", "content": "hi"}]},
    "content not list or str": {**GOOD, "messages": [{"role": "user", "content": 5}]},
    "unknown part type": {**GOOD, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
    "text part without text": {**GOOD, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    "image part without url": {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "image_url not object": {**GOOD, "messages": user("hi", None) + [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]},
    "remote url refused": {**GOOD, "messages": user("hi", "http://127.0.0.1:9/cat.png")},
    "file url": {**GOOD, "messages": user("hi", "file:///etc/passwd")},
    "data uri not base64": {**GOOD, "messages": user("hi", "data:image/png,rawbytes")},
    "data uri bad base64": {**GOOD, "messages": user("hi", "data:image/png;base64,@@@notbase64")},
    "data uri not image type": {**GOOD, "messages": user("hi", "data:text/plain;base64,aGVsbG8=")},
    "data uri not an image": {**GOOD, "messages": user("hi", "data:image/png;base64," + base64.b64encode(b"hello world").decode())},
    "too many pixels": {**GOOD, "messages": user("hi", _big_png_uri(400))},
    "image in assistant turn": {**GOOD, "messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}]}, {"role": "user", "content": "hi"}]},
    "placeholder in text": {**GOOD, "messages": user("look <image> here")},
    "last message from assistant": {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]},
    "max_tokens too large": {**GOOD, "max_tokens": 10_000},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_tokens not int": {**GOOD, "max_tokens": "many"},
    "temperature out of range": {**GOOD, "temperature": 7},
    "top_p zero": {**GOOD, "top_p": 0},
    "n > 1": {**GOOD, "n": 3},
    "too many stops": {**GOOD, "stop": ["a", "b", "c", "d", "e"]},
    "unknown model": {**GOOD, "model": "gpt-4o"},
    "too many bytes": {**GOOD, "padding": "x" * 300_000},
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_a_clear_4xx(server, name):
    base, _ = server
    status, body, _ = request(base, "POST", "/v1/chat/completions", MALFORMED[name], {"Authorization": f"Bearer {KEY}"})
    assert 400 <= status < 500, (name, status, body)
    assert isinstance(body, dict) and body["error"]["message"], body


def test_unknown_route_and_method_are_4xx_with_error_body(server):
    base, _ = server
    status, body, _ = request(base, "GET", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 405 and "error" in body
    status, body, _ = request(base, "GET", "/v1/nothing")
    assert status == 404 and "error" in body


def test_prompt_longer_than_context_is_400(tiny):
    model, _ = tiny
    from vlmkit.processing import build_chat_processor

    app = create_app(model, build_chat_processor(model, 40), ServerSettings(model_name=MODEL))
    with running_server(app) as base:
        status, body, _ = request(base, "POST", "/v1/chat/completions", {"model": MODEL, "messages": user("a" * 100), "max_tokens": 2})
    assert status == 400 and "context" in body["error"]["message"]


def test_load_32_concurrent_clients_all_answered(tiny, server, client):
    """40 clients at once: every answer arrives, equals its one-by-one answer, and was batched."""
    base, app = server
    batches_before = app.state.batcher.stats["batches"]
    questions = [f"Question number {i}?" + "!" * (i % 7) for i in range(40)]
    uris = [png_data_uri((i * 6 % 255, 90, 255 - i * 5 % 255)) for i in range(40)]

    def one(i):
        if i % 4 == 0:  # a quarter stream, to mix both paths in the same batches
            s = client.chat.completions.create(model=MODEL, messages=user(questions[i], uris[i]), max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        r = client.chat.completions.create(model=MODEL, messages=user(questions[i], uris[i]), max_tokens=8, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(one, range(40)))
    assert len(answers) == 40 and all(isinstance(a, str) for a in answers)
    for i in (0, 13, 39):
        assert answers[i] == expected_text(tiny, questions[i], uris[i], 8)
    stats = app.state.batcher.stats
    assert stats["largest_batch"] > 1
    assert stats["batches"] - batches_before < 40
    status, body, _ = request(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["waiting"] == 0
    again = client.chat.completions.create(model=MODEL, messages=user("still there?"), max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_mid_stream_leaves_server_healthy(server):
    base, app = server
    host, port = base.split("//")[1].split(":")
    body = json.dumps({"model": MODEL, "messages": user("long answer please"), "max_tokens": 64, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200" in s.recv(64)
    status, health, _ = request(base, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, _, _ = request(base, "POST", "/v1/chat/completions", GOOD, {"Authorization": f"Bearer {KEY}"})
    assert status == 200


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=user("Say something"), max_tokens=8, temperature=1.2, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_remote_images_only_when_enabled(tiny):
    """With --allow-remote-images the server fetches http(s) URLs (here from a loopback server)."""
    png = base64.b64decode(png_data_uri().split(",", 1)[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/red.png"
    model, processor = tiny
    try:
        with running_server(create_app(model, processor, ServerSettings(model_name=MODEL, allow_remote_images=True))) as base:
            status, body, _ = request(base, "POST", "/v1/chat/completions", {"model": MODEL, "messages": user("what?", url), "max_tokens": 2})
            assert status == 200, body
            status, body, _ = request(base, "POST", "/v1/chat/completions", {"model": MODEL, "messages": user("what?", "http://127.0.0.1:1/none.png"), "max_tokens": 2})
            assert status == 400 and "could not fetch" in body["error"]["message"]
    finally:
        images.shutdown()


class _ByteTok:
    """Decodes ids as raw UTF-8 bytes, like a byte-level tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_assembler_holds_partial_characters_and_stop_strings():
    asm = TextAssembler(_ByteTok(), stop=["END"])
    out = [asm.add(b) for b in "é ok EN".encode()]
    assert "".join(out) == "é ok "  # "EN" may begin "END": held back
    assert out[0] == ""  # first byte of "é" alone is not a character
    assert asm.add(ord("D")) == "" and asm.stopped
    asm2 = TextAssembler(_ByteTok(), stop=["END"])
    for b in b"hi EN":
        asm2.add(b)
    assert asm2.finish() == "EN"  # no stop after all: released at the end


def test_batched_server_rows_match_alone_under_mixed_lengths(tiny):
    """The batcher's per-row limits: a short request in a batch with a long one ends on time."""
    from vlmkit.generate import generate_steps

    model, processor = tiny
    prompts = [processor.encode_prompt([Message("user", q)], []) for q in ("a", "a much longer question")]
    steps = list(generate_steps(model, prompts, GenerationConfig(max_new_tokens=9), max_new_tokens=[2, 9]))
    first = [s.tokens[0] for s in steps if s.tokens[0] is not None]
    assert len(first) <= 2
    alone = generate(model, prompts[:1], GenerationConfig(max_new_tokens=2))[0]
    assert first == alone
