"""Hypothesis fuzzing: chat requests (schema-shaped and junk) get a 200 or a documented 4xx with
an OpenAI-style error body, never a 500; LLaVA records become a Sample or a BadRecordError, and
a Sample encodes or raises a BadRecordError, nothing else."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402
from _serve_util import png_data_uri, request, running_server, tiny_model  # noqa: E402
from _tiny import tiny_config  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from vlmkit.data.formats import BadRecordError, Sample, record_to_sample  # noqa: E402
from vlmkit.model.vlm import VisionLanguageModel  # noqa: E402
from vlmkit.processing import build_chat_processor  # noqa: E402
from vlmkit.serve.app import ServerSettings, create_app  # noqa: E402

MODEL = "tiny"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)

# ---- values ----------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
junk = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8)
# Text with the characters that have broken things: placeholders, the image token, surrogates.
tricky_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["<image>", "<video>", "<image_1>", "<video_2>", "<image_0>", "\ud800", "x\udfffy", "", " ", "\x00", "<|im_start|>"]),
    st.lists(st.sampled_from(["hi", "<video>", "<image_3>", "\ud83d", "é", "\n"]), max_size=4).map("".join),
)
IMAGE_URLS = [png_data_uri(), "data:image/png;base64,AAAA", "data:text/plain;base64,aGk=", "http://127.0.0.1:9/x.png", "file:///etc/passwd", ""]

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": tricky_text})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.sampled_from(IMAGE_URLS)})})
content = st.one_of(tricky_text, st.none(), st.lists(st.one_of(text_part, image_part, junk), max_size=3), junk)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]), "content": content}),
    junk,
)
number = st.one_of(st.integers(min_value=-(2**66), max_value=2**66), st.floats(allow_nan=False), st.sampled_from([0, 1, 2, 1e-300, 5e-324]), junk)
chat_request = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), junk), "messages": st.one_of(st.lists(message, min_size=1, max_size=3), junk)},
    optional={"max_tokens": number, "max_completion_tokens": number, "temperature": number, "top_p": number, "seed": number,
              "n": number, "stop": st.one_of(tricky_text, st.lists(tricky_text, max_size=5), junk), "stream": st.one_of(st.booleans(), junk),
              "stream_options": junk},
)

# Mostly well-formed requests with tricky text, so the fuzzing also reaches the tokenizer,
# the template and generation, not only the schema.
plain_text = st.one_of(tricky_text, st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20))
user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    plain_text, st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": plain_text}),
                                   st.just({"type": "image_url", "image_url": {"url": IMAGE_URLS[0]}})), min_size=1, max_size=3))})
other_turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant", "developer"]), "content": plain_text})
conversation = st.tuples(st.lists(st.one_of(user_turn, other_turn), max_size=2), user_turn).map(lambda t: [*t[0], t[1]])
valid_request = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": conversation, "max_tokens": st.integers(1, 2)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True), "seed": st.integers(-(2**63), 2**64 - 1),
              "stop": st.one_of(plain_text, st.lists(plain_text, max_size=4))},
)
chat_request = st.one_of(valid_request, valid_request, chat_request)

DOCUMENTED = {200, 400, 404, 413}


@pytest.fixture(scope="module")
def server():
    model, processor = tiny_model()
    settings_ = ServerSettings(model_name=MODEL, api_key="k", max_request_bytes=100_000, max_image_pixels=100_000, max_tokens_limit=2,
                               default_max_tokens=2, max_batch=8, max_wait_ms=1)
    with running_server(create_app(model, processor, settings_)) as base:
        yield base


@FUZZ
@given(body=chat_request)
def test_fuzzed_chat_requests_get_a_documented_answer(server, body):
    if isinstance(body.get("stream"), bool):
        body["stream"] = False  # a streamed reply is one text body; the schema is what is fuzzed
    status, payload, _ = request(server, "POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer k"})
    assert status in DOCUMENTED, (status, payload)
    hypothesis.event(f"status {status}")
    if status == 200:
        assert payload["choices"][0]["message"]["role"] == "assistant"
    else:
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
        assert " object at 0x" not in payload["error"]["message"]


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_fuzzed_raw_bodies_are_refused_cleanly(server, raw):
    status, payload, _ = request(server, "POST", "/v1/chat/completions", raw, {"Authorization": "Bearer k"})
    assert status in DOCUMENTED - {200}, (status, payload)


# ---- LLaVA records ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proc_and_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-media")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(root / "a.png")
    (root / "b.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)
    return build_chat_processor(model, 128), root


speaker = st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot", "", 3, None])
turn = st.one_of(st.fixed_dictionaries({"from": speaker, "value": st.one_of(tricky_text, junk)}), junk)
good_turns = st.tuples(st.sampled_from(["human", "user"]), plain_text, st.sampled_from(["gpt", "assistant"]), plain_text).map(
    lambda t: [{"from": t[0], "value": "<image>\n" + t[1]}, {"from": t[2], "value": t[3]}])
mostly_good_record = st.fixed_dictionaries({"id": st.text(max_size=10), "image": st.just("a.png"), "conversations": good_turns})
llava_record = st.one_of(
    mostly_good_record, mostly_good_record,
    st.fixed_dictionaries(
        {"conversations": st.one_of(st.lists(turn, max_size=4), junk)},
        optional={"id": st.one_of(st.text(max_size=10), junk), "image": st.one_of(st.sampled_from(["a.png", "b.png", "missing.png"]),
                                                                                   st.lists(st.sampled_from(["a.png", "b.png"]), max_size=2), junk),
                  "video": junk},
    ),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), junk)}, optional={"images": junk, "id": junk}),
    junk,
)


@FUZZ
@given(record=llava_record)
def test_fuzzed_llava_records_raise_only_bad_record_errors(proc_and_root, record):
    proc, root = proc_and_root
    try:
        sample = record_to_sample(record, 0, root, "fuzz.json")
    except BadRecordError as e:
        assert e.record_id and "fuzz.json" in str(e)
        hypothesis.event("refused when read")
        return
    assert isinstance(sample, Sample) and all(isinstance(m.content, str) for m in sample.messages)
    try:
        encoded = proc.encode(sample)
    except BadRecordError:
        hypothesis.event("refused when encoded")
        return
    hypothesis.event("encoded")
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    # Image tokens are never targets.
    assert not ((encoded.input_ids == image_id) & (encoded.labels != -100)).any()
