"""Hostile and careless requests against a real server: each gets its exact status and error code
(never a 500), the body never shows Python internals, and the server stays healthy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve_util import png_data_uri, request, running_server, tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from vlmkit.data.formats import Message  # noqa: E402
from vlmkit.serve import parsing  # noqa: E402  (image decoding lives there)
from vlmkit.serve.app import ServerSettings, create_app  # noqa: E402

KEY = "hostile-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_request_bytes=300_000, max_image_pixels=100_000,
                              max_tokens_limit=64, max_batch=8, max_wait_ms=5)
    with running_server(create_app(model, processor, settings)) as base:
        yield base


def healthy(base: str) -> bool:
    status, body, _ = request(base, "GET", "/health")
    return status == 200 and body["status"] == "ok"


def user(text, image_uri=None):
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}] if image_uri else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def ico_wrapping_png(side: int) -> bytes:
    png = encode(Image.new("RGB", (side, side)))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def png_claiming(width: int, height: int) -> bytes:
    import zlib

    data = bytearray(encode(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


GOOD = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def raw(obj: dict) -> str:
    return json.dumps(obj)


# name -> (body, expected status, expected error code or None, expected param or None)
REFUSED = {
    "nested 200 KB in an unknown field": ('{"model": "tiny", "messages": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "invalid_json", None),
    "nested 200 KB as the body": ("[" * 100_000 + "]" * 100_000, 400, "invalid_json", None),
    "nested objects 100 KB": ('{"a":' * 20_000 + "1" + "}" * 20_000, 400, "invalid_json", None),
    "5000-digit max_tokens": (raw(GOOD)[:-1] + ', "max_tokens": ' + "9" * 5000 + "}", 400, "invalid_json", None),
    "5000-digit integer elsewhere": (raw(GOOD)[:-1] + ', "extra": ' + "1" * 5000 + "}", 400, "invalid_json", None),
    "lone surrogate in text": (raw(GOOD).replace('"hi"', '"hi \\ud800"'), 400, "invalid_json", None),
    "lone low surrogate in text": (raw(GOOD).replace('"hi"', '"\\udfff"'), 400, "invalid_json", None),
    "lone surrogate in stop": (raw({**GOOD, "stop": "x"}).replace('"x"', '"\\ud83d"'), 400, "invalid_json", None),
    "lone surrogate in model": (raw(GOOD).replace('"tiny"', '"\\ud800"'), 400, "invalid_json", None),
    "seed 2**64": ({**GOOD, "seed": 2**64, "temperature": 1}, 400, None, "seed"),
    "seed below -2**63": ({**GOOD, "seed": -(2**63) - 1, "temperature": 1}, 400, None, "seed"),
    "max_completion_tokens 0": ({**GOOD, "max_completion_tokens": 0}, 400, None, "max_completion_tokens"),
    "max_tokens 0": ({**GOOD, "max_tokens": 0}, 400, None, "max_tokens"),
    "max_completion_tokens above the limit": ({**GOOD, "max_completion_tokens": 65}, 400, None, "max_completion_tokens"),
    "max_tokens negative": ({**GOOD, "max_tokens": -5}, 400, None, "max_tokens"),
    "NaN temperature": (raw(GOOD)[:-1] + ', "temperature": NaN}', 400, None, "temperature"),
    "Infinity top_p": (raw(GOOD)[:-1] + ', "top_p": Infinity}', 400, None, "top_p"),
    "temperature 1e400": (raw(GOOD)[:-1] + ', "temperature": 1e400}', 400, None, "temperature"),
    "top_p zero": ({**GOOD, "top_p": 0}, 400, None, "top_p"),
    "the image token as text": ({**GOOD, "messages": user("look <image> here")}, 400, None, "messages.0.content"),
    "body null": ("null", 400, "invalid_json", None),
    "body a string": ('"hello"', 400, "invalid_json", None),
    "body empty": ("", 400, "invalid_json", None),
    "messages an object": ({**GOOD, "messages": {"role": "user"}}, 400, None, "messages"),
    "message not an object": ({**GOOD, "messages": ["hi"]}, 400, None, "messages.0"),
    "content part not an object": ({**GOOD, "messages": [{"role": "user", "content": [5]}]}, 400, None, None),
    "text part text a number": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, None, None),
    "stop a number": ({**GOOD, "stop": 5}, 400, None, None),
    "stream 5": ({**GOOD, "stream": 5}, 400, None, "stream"),
    "model a list": ({**GOOD, "model": [MODEL]}, 400, None, "model"),
    "n zero": ({**GOOD, "n": 0}, 400, None, "n"),
    "eps image named png": ({**GOOD, "messages": user("hi", b64(EPS))}, 400, "invalid_image", "messages"),
    "ico wrapping a 3000x3000 png": ({**GOOD, "messages": user("hi", b64(ico_wrapping_png(3000), "image/x-icon"))}, 400, "invalid_image", "messages"),
    "png claiming 65535x65535": ({**GOOD, "messages": user("hi", b64(png_claiming(65535, 65535)))}, 400, "invalid_image", "messages"),
    "garbage image bytes": ({**GOOD, "messages": user("hi", b64(b"not an image at all"))}, 400, "invalid_image", "messages"),
    "truncated png": ({**GOOD, "messages": user("hi", b64(encode(Image.new("RGB", (30, 30), 7))[:70]))}, 400, "invalid_image", "messages"),
    "pdf data uri": ({**GOOD, "messages": user("hi", b64(b"%PDF-1.4", "application/pdf"))}, 400, "invalid_image_url", "messages"),
    "javascript url": ({**GOOD, "messages": user("hi", "javascript:alert(1)")}, 400, "invalid_image_url", "messages"),
    "nine images": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}] * 9}]}, 400, None, "messages.0.content"),
    "image in a system message": ({**GOOD, "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}]}, *user("hi")]}, 400, None, "messages.0.content"),
    "prompt longer than the context": ({**GOOD, "messages": user("word " * 2000)}, 400, "invalid_prompt", "messages"),
    "too many stops": ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model_not_found", "model"),
    "body over the cap": ({**GOOD, "padding": "x" * 310_000}, 413, "request_too_large", None),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_hostile_request_gets_its_exact_refusal(server, name):
    body, status, code, param = REFUSED[name]
    got, payload, _ = request(server, "POST", "/v1/chat/completions", body, AUTH)
    assert got == status, (name, got, payload)
    error = payload["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert " object at 0x" not in error["message"] and "Traceback" not in error["message"]
    assert healthy(server)


ANSWERED = {
    "seed 2**64 - 1": {**GOOD, "seed": 2**64 - 1, "temperature": 1},
    "seed -2**63": {**GOOD, "seed": -(2**63), "temperature": 1},
    "top_p 1e-300": {**GOOD, "top_p": 1e-300, "temperature": 1},
    "top_p 5e-324": {**GOOD, "top_p": 5e-324, "temperature": 2},
    "html video tag in text": {**GOOD, "messages": user("What does the HTML <video> tag do?")},
    "image_k in text": {**GOOD, "messages": user("Compare <image_1> and <image_2>.")},
    "video_k in a system message": {**GOOD, "messages": [{"role": "system", "content": "Refer to <video_1> as 'the clip'."}, *user("hi")]},
    "placeholders next to a real image": {**GOOD, "messages": user("Is this <image_1> or a <video>?", png_data_uri())},
    "assistant message first": {**GOOD, "messages": [{"role": "assistant", "content": "Hello!"}, *user("hi")]},
    "user content null then user": {**GOOD, "messages": [{"role": "user", "content": None}, *user("hi")]},
    "OpenAI fields at values that change nothing": {**GOOD, "logprobs": False, "frequency_penalty": 0, "user": "x", "n": 1},
    "emoji and astral text": {**GOOD, "messages": user("🦙 \U0001F600 \u0301 \u200b")},
    "body with a UTF-8 BOM": "\ufeff" + raw(GOOD),
}


@pytest.mark.parametrize("name", list(ANSWERED))
def test_careless_but_valid_request_is_answered(server, name):
    status, payload, _ = request(server, "POST", "/v1/chat/completions", ANSWERED[name], AUTH)
    assert status == 200, (name, payload)
    assert payload["choices"][0]["message"]["role"] == "assistant"
    assert payload["usage"]["completion_tokens"] <= 2  # an end-of-text token may come first
    assert healthy(server)


def test_max_completion_tokens_wins_and_is_never_treated_as_unset(server):
    status, payload, _ = request(server, "POST", "/v1/chat/completions",
                                 {**GOOD, "max_tokens": 50, "max_completion_tokens": 1}, AUTH)
    assert status == 200 and payload["usage"]["completion_tokens"] == 1


def test_user_text_with_placeholders_is_tokenised_as_literal_text(tiny, server):
    model, processor = tiny
    text = "What does the HTML <video> tag do? Compare <image_1> and <image_2>."
    status, payload, _ = request(server, "POST", "/v1/chat/completions", {**GOOD, "messages": user(text)}, AUTH)
    assert status == 200, payload
    never = re.compile(r"(?!)(x)(y)")  # matches nothing: every character of the text is text
    expected = processor.encode_prompt([Message("user", text)], [], placeholder_re=never)
    assert payload["usage"]["prompt_tokens"] == len(expected.input_ids)


def test_images_are_decoded_off_the_event_loop(server, monkeypatch):
    threads = []
    real = parsing.load_image

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append("worker")
        return real(*args, **kwargs)

    monkeypatch.setattr(parsing, "load_image", spy)
    status, payload, _ = request(server, "POST", "/v1/chat/completions", {**GOOD, "messages": user("hi", png_data_uri())}, AUTH)
    assert status == 200, payload
    assert threads == ["worker"]


def test_declared_content_length_over_the_cap_is_413(server):
    import http.client

    conn = http.client.HTTPConnection(server.split("//", 1)[1], timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and body["error"]["code"] == "request_too_large"
    assert healthy(server)


def test_unexpected_errors_are_a_plain_500_without_internals(tiny, monkeypatch):
    model, processor = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("secret <object at 0xdeadbeef> details")

    app = create_app(model, processor, ServerSettings(model_name=MODEL))
    monkeypatch.setattr(processor, "encode_prompt", broken)
    with running_server(app) as base:
        status, payload, _ = request(base, "POST", "/v1/chat/completions", GOOD)
        assert status == 500
        assert payload["error"] == {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
        assert healthy(base)


# ---- a server without an API key: Host and Origin ------------------------------------------------

@pytest.fixture(scope="module")
def open_server(tiny):
    model, processor = tiny
    settings = ServerSettings(model_name=MODEL, max_tokens_limit=8, allowed_hosts=["vlm.internal"],
                              allowed_origins=["http://localhost:3000"])
    with running_server(create_app(model, processor, settings)) as base:
        yield base


def port_of(base: str) -> str:
    return base.rsplit(":", 1)[1]


SITE_CASES = {
    # name -> (extra headers, expected status, expected code)
    "rebinding host": ({"Host": "attacker.example"}, 403, "host_not_allowed"),
    "rebinding host with port": ({"Host": "attacker.example:{port}"}, 403, "host_not_allowed"),
    "host that only starts like localhost": ({"Host": "localhost.attacker.example:{port}"}, 403, "host_not_allowed"),
    "cross-site origin": ({"Origin": "http://attacker.example"}, 403, "origin_not_allowed"),
    "cross-site text/plain post": ({"Origin": "https://attacker.example", "Content-Type": "text/plain"}, 403, "origin_not_allowed"),
    "null origin": ({"Origin": "null"}, 403, "origin_not_allowed"),
    "origin on another port": ({"Origin": "http://127.0.0.1:1"}, 403, "origin_not_allowed"),
    "same origin": ({"Origin": "http://127.0.0.1:{port}"}, 200, None),
    "no origin (curl, sdk)": ({}, 200, None),
    "localhost host": ({"Host": "localhost:{port}"}, 200, None),
    "ipv6 loopback host": ({"Host": "[::1]:{port}"}, 200, None),
    "configured host": ({"Host": "vlm.internal:{port}"}, 200, None),
    "configured origin": ({"Origin": "http://localhost:3000"}, 200, None),
}


@pytest.mark.parametrize("name", list(SITE_CASES))
def test_server_without_key_checks_host_and_origin(open_server, name):
    headers, status, code = SITE_CASES[name]
    headers = {k: v.format(port=port_of(open_server)) for k, v in headers.items()}
    got, payload, _ = request(open_server, "POST", "/v1/chat/completions", {**GOOD, "max_tokens": 1}, headers)
    assert got == status, (name, payload)
    if code:
        assert payload["error"]["code"] == code
    assert healthy(open_server)


def test_host_check_also_guards_models_and_the_page_but_not_health(open_server):
    evil = {"Host": "attacker.example"}
    assert request(open_server, "GET", "/v1/models", None, evil)[0] == 403
    assert request(open_server, "GET", "/", None, evil)[0] == 403
    assert request(open_server, "GET", "/health", None, evil)[0] == 200


def test_server_with_key_does_not_need_host_checks(server):
    status, _, _ = request(server, "POST", "/v1/chat/completions", GOOD, {**AUTH, "Host": "anything.example", "Origin": "http://else.example"})
    assert status == 200


# ---- round 2: request fields, echoed values, unfinished bodies -----------------------------------
# Fields the server would ignore are refused by name (OpenAI's "Unrecognized request argument" or
# "Unsupported parameter"); fields of OpenAI's API at values that change nothing are answered.

FIELD_REFUSED = {
    # name -> (extra fields, expected param, expected code or None for a type error)
    "logprobs true": ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    "top_logprobs": ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "unsupported_parameter"),
    "tool_choice required": ({"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    "response_format json_object": ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    "response_format json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "unsupported_parameter"),
    "response_format 5": ({"response_format": 5}, "response_format", None),
    "response_format of an unknown type": ({"response_format": {"type": "xml"}}, "response_format.type", None),
    "logprobs a list": ({"logprobs": [1]}, "logprobs", None),
    "tools a string": ({"tools": "all of them"}, "tools", None),
    "frequency_penalty 0.5": ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    "presence_penalty out of range": ({"presence_penalty": 9}, "presence_penalty", None),
    "logit_bias": ({"logit_bias": {"50": 100}}, "logit_bias", "unsupported_parameter"),
    "audio output": ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    "store true": ({"store": True}, "store", "unsupported_parameter"),
    "reasoning_effort": ({"reasoning_effort": "high"}, "reasoning_effort", "unsupported_parameter"),
    "field not in the OpenAI API": ({"frobnicate": True}, "frobnicate", "unknown_parameter"),
    "completions-only echo": ({"echo": True}, "echo", "unknown_parameter"),
    "typo of max_tokens": ({"max_token": 5}, "max_token", "unknown_parameter"),
    "unknown stream option": ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}}, "stream_options.chunk_size", "unknown_parameter"),
    "unknown message field": ({"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages.0.mood", "unknown_parameter"),
    "message name": ({"messages": [{"role": "user", "content": "hi", "name": "alice"}]}, "messages.0.name", "unsupported_parameter"),
    "assistant tool calls": ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                                           *user("hi")]}, "messages.0.tool_calls", "unsupported_parameter"),
}


@pytest.mark.parametrize("name", list(FIELD_REFUSED))
def test_unsupported_or_unknown_field_is_refused_by_name(server, name):
    extra, param, code = FIELD_REFUSED[name]
    status, payload, _ = request(server, "POST", "/v1/chat/completions", {**GOOD, **extra}, AUTH)
    assert status == 400, (name, payload)
    error = payload["error"]
    assert error["param"] == param, error
    assert param.rsplit(".", 1)[-1] in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    assert healthy(server)


FIELD_ANSWERED = {
    "defaults spelled out": {"logprobs": False, "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                             "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "response_format": {"type": "text"},
                             "modalities": ["text"], "store": False, "service_tier": "auto", "verbosity": "medium"},
    "bookkeeping fields": {"user": "user-1", "metadata": {"run": "a"}, "safety_identifier": "h", "prompt_cache_key": "k"},
    "nulls mean unset": {"logprobs": None, "tools": None, "response_format": None, "user": None, "stop": None, "seed": None},
    "stream options without usage": {"stream_options": {"include_usage": False}},
    "replayed assistant message": {"messages": [*user("hi"), {"role": "assistant", "content": "Hello", "refusal": None,
                                                              "tool_calls": None, "function_call": None, "audio": None}, *user("and?")]},
}


@pytest.mark.parametrize("name", list(FIELD_ANSWERED))
def test_openai_fields_at_values_that_change_nothing_are_answered(server, name):
    status, payload, _ = request(server, "POST", "/v1/chat/completions", {**GOOD, **FIELD_ANSWERED[name]}, AUTH)
    assert status == 200, (name, payload)
    assert payload["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_keeps_working_and_sees_refusals_by_name(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    resp = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, temperature=0, logprobs=False,
                                          user="u", response_format={"type": "text"}, n=1)
    assert resp.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, logprobs=True)
    assert caught.value.body["param"] == "logprobs"


ONE_MB = "m" * 1_000_000


@pytest.mark.parametrize("body, status", [
    ({"model": ONE_MB, "messages": user("hi")}, 404),
    ({"model": MODEL, "messages": user("hi"), ONE_MB: 1}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": ONE_MB}]}]}, 400),
    ({"model": MODEL, "messages": user("hi", "data:" + ONE_MB + "/png;base64,AAAA")}, 400),
], ids=["model name", "field name", "part type", "media type"])
def test_error_messages_quote_at_most_a_clip_of_a_huge_value(open_server, body, status):
    got, payload, _ = request(open_server, "POST", "/v1/chat/completions", body)
    assert got == status, payload
    assert len(json.dumps(payload)) < 1_000, len(json.dumps(payload))
    assert "mmmm" in payload["error"]["message"] and "..." in payload["error"]["message"]


@pytest.fixture(scope="module")
def impatient_server(tiny):
    model, processor = tiny
    with running_server(create_app(model, processor, ServerSettings(model_name=MODEL, body_timeout_s=1.0))) as base:
        yield base


def _unfinished_request(base: str, framing: bytes, start: bytes) -> tuple[bytes, float]:
    """Headers and the start of a body that never ends; what the server answers before closing
    the connection, and how long that took."""
    import socket
    import time

    host, port = base.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + framing + b"\r\n" + start)
        began, answer = time.monotonic(), b""
        while True:
            data = sock.recv(65536)  # b"" once the server closed; socket.timeout if it never does
            if not data:
                return answer, time.monotonic() - began
            answer += data


@pytest.mark.parametrize("framing, start", [
    (b"Transfer-Encoding: chunked\r\n", b"10\r\n" + b'{"model": "tiny"' + b"\r\n"),
    (b"Content-Length: 500\r\n", b'{"model": "tiny", "mess'),
], ids=["chunked without its last chunk", "content-length never reached"])
def test_unfinished_body_gets_408_and_a_closed_connection(impatient_server, framing, start):
    answer, took = _unfinished_request(impatient_server, framing, start)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert took < 8, took
    assert healthy(impatient_server)


def test_body_timeout_is_a_serve_option():
    from typer.testing import CliRunner

    from vlmkit.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert "--body-timeout" in result.output


# ---- round 2: a model that emits its own image-placeholder token ---------------------------------
# Generated tokens are text: an imported model whose head prefers its image token keeps decoding,
# token for token as transformers' generate does (which embeds it as an ordinary token).


def _prefer_image_token(model, ref, prompt) -> None:
    """Make the image token outscore, by a little, a token the model emits early, in both models."""
    from vlmkit.generate import GenerationConfig, generate

    early = generate(model, [prompt], GenerationConfig(max_new_tokens=3))[0][-1]
    with torch.no_grad():
        for head in (model.llm.get_output_embeddings(), ref.get_output_embeddings()):
            head.weight[model.image_token_id] = head.weight[early] * 1.05


def _qwen2vl_case(root):
    from qwen2_vl_folder import save_qwen2vl
    from transformers import Qwen2VLForConditionalGeneration

    folder = save_qwen2vl(root / "hf")
    ref = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()

    def inputs(model, prompt, image):
        ids = prompt.input_ids[None]
        return {"input_ids": ids, "pixel_values": torch.cat([im.pixel_values for im in prompt.images]),
                "image_grid_thw": torch.tensor([im.views[0].grid for im in prompt.images]),
                "mm_token_type_ids": (ids == model.image_token_id).int()}

    return folder, ref, inputs


def _llava_next_case(root):
    from llava_next_folder import save_llava_next
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    folder = save_llava_next(root / "hf")
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    processor = LlavaNextProcessor.from_pretrained(folder, local_files_only=True,
                                                   image_processor=LlavaNextImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                                   tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))

    def inputs(model, prompt, image):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        got = processor(images=image, text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                        return_tensors="pt")
        assert got["input_ids"][0].tolist() == prompt.input_ids.tolist()
        return dict(got, pixel_values=prompt.images[0].pixel_values[None])

    return folder, ref, inputs


@pytest.mark.parametrize("family, lean", [("qwen2vl", None), ("llava-next", True), ("llava-next", False)],
                         ids=["qwen2-vl (M-RoPE, cached forward)", "llava-next (fast decode)", "llava-next (cached forward)"])
def test_generated_image_token_is_decoded_as_text_like_transformers(tmp_path, monkeypatch, family, lean):
    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.hf.registry import import_hf
    from vlmkit.model import fast_decode
    from vlmkit.processing import build_chat_processor
    from vlmkit.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    folder, ref, reference_inputs = (_qwen2vl_case if family == "qwen2vl" else _llava_next_case)(tmp_path)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    if lean is not None:
        assert fast_decode.supports(model.llm)
        if not lean:
            monkeypatch.setattr(fast_decode, "supports", lambda llm: False)
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(45, 71, 3, generator=g) * 255).byte().numpy())  # the 71x45 of the report
    text = "<image>Describe." if family == "qwen2vl" else "<image>\nDescribe."  # each family's template
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", text)], [image])
    _prefer_image_token(model, ref, prompt)

    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=10))[0]
    assert model.image_token_id in ours  # the case under test: the model did emit it
    inputs = reference_inputs(model, prompt, image)
    theirs = ref.generate(**inputs, max_new_tokens=10, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    assert ours == theirs[: next((i for i, t in enumerate(theirs) if t in stops), len(theirs))]
