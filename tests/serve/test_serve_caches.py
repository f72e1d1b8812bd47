"""Continuous batching, the image-feature and prefix caches, and int8 weights, through real HTTP
(uvicorn on loopback, the official `openai` client) on a tiny random model."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from _serve_util import png_data_uri, request, running_server, tiny_model

from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.processing import build_chat_processor
from vlmkit.processing.images import load_image
from vlmkit.serve import engine
from vlmkit.serve.app import ServerSettings, create_app
from vlmkit.serve.batching import DynamicBatcher
from vlmkit.serve.caches import BLOCK, ByteLRU, FeatureCache, PrefixCache, image_key, weights_key

MODEL = "tiny"
SYSTEM = "Be brief and precise."


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def messages(question: str, uri: str | None, system: bool = True) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": uri}}] if uri else []) + [{"type": "text", "text": question}]
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": parts}]


def alone(tiny, question: str, uri: str | None, max_tokens: int, system: bool = True) -> str:
    """The one-by-one greedy answer of vlmkit's own `generate`."""
    model, processor = tiny
    images = [load_image(base64.b64decode(uri.split(",", 1)[1]))] if uri else []
    convo = ([Message("system", SYSTEM)] if system else []) + [Message("user", ("<image>\n" if uri else "") + question)]
    tokens = generate(model, [processor.encode_prompt(convo, images)], GenerationConfig(max_new_tokens=max_tokens))[0]
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def ask(client, question, uri, max_tokens=24, system=True) -> str:
    resp = client.chat.completions.create(model=MODEL, messages=messages(question, uri, system), max_tokens=max_tokens, temperature=0)
    return resp.choices[0].message.content


def client_for(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(base) -> dict:
    return request(base, "GET", "/health")[1]


def test_continuous_batching_is_the_default_and_static_stays_selectable(tiny):
    model, processor = tiny
    assert isinstance(create_app(model, processor, ServerSettings()).state.batcher, engine.ContinuousBatcher)
    static = create_app(model, processor, ServerSettings(batching="static")).state.batcher
    assert isinstance(static, DynamicBatcher)
    with pytest.raises(ValueError, match="batching"):
        create_app(model, processor, ServerSettings(batching="eventually"))


@pytest.fixture
def nan_uninitialised(monkeypatch):
    """New tensors from `torch.empty` hold NaN: uninitialised memory may, on another machine."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def test_request_joins_a_running_batch_and_leaves_when_done(tiny, monkeypatch, nan_uninitialised):
    """A request sent while another decodes is answered before the first ends; both answers
    equal their one-by-one greedy answers, whatever the memory under masked cache columns held."""
    model, processor = tiny
    # A tiny model decodes 150 tokens faster than a loaded machine delivers the second HTTP
    # request, so the lone row's decoding holds once (at most 20 s) until that request is queued.
    real_step, held = engine.ContinuousBatcher._step, threading.Event()

    def step_once_joined(self):
        if not held.is_set() and len(self._rows) == 1:
            deadline = time.monotonic() + 20
            while self._queue.qsize() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            held.set()
        return real_step(self)

    monkeypatch.setattr(engine.ContinuousBatcher, "_step", step_once_joined)
    uri = png_data_uri((30, 90, 200))
    long_q, short_q = "What colour?", "Why?"
    want_long, want_short = alone(tiny, long_q, uri, 150), alone(tiny, short_q, uri, 8)
    app = create_app(model, processor, ServerSettings(model_name=MODEL, max_tokens_limit=200))
    with running_server(app) as base:
        client = client_for(base)
        first_token, short_done, short = threading.Event(), [], []

        def second():
            first_token.wait(30)
            short.append(ask(client, short_q, uri, 8))
            short_done.append(time.monotonic())

        t = threading.Thread(target=second)
        t.start()
        pieces = []
        for chunk in client.chat.completions.create(model=MODEL, messages=messages(long_q, uri), max_tokens=150, temperature=0, stream=True):
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                if c.delta.content:
                    first_token.set()
        long_done = time.monotonic()
        t.join(30)
        stats = health(base)
    assert "".join(pieces) == want_long and short == [want_short]
    assert short_done[0] < long_done  # it did not wait for the long answer
    assert stats["largest_batch"] == 2 and stats["batches"] == 1  # one run of decoding, joined mid-way


def test_caches_hit_and_answers_equal_the_uncached_server(tiny):
    """The same image with several questions: the tower runs once per image, the system turn
    and the image are prefilled once, and every answer equals the cache-free static server's."""
    model, processor = tiny
    red, blue = png_data_uri((200, 30, 30)), png_data_uri((30, 30, 200))
    asks = [("What colour?", red), ("Describe.", red), ("Count.", red), ("What colour?", blue), ("Describe.", blue)]
    answers = {}
    for name, settings in {
        "cached": ServerSettings(model_name=MODEL),
        "uncached": ServerSettings(model_name=MODEL, feature_cache_mb=0, prefix_cache_mb=0),
        "static": ServerSettings(model_name=MODEL, batching="static", feature_cache_mb=0, prefix_cache_mb=0),
    }.items():
        with running_server(create_app(model, processor, settings)) as base:
            answers[name] = [ask(client_for(base), q, uri) for q, uri in asks]
            stats = health(base)
        if name == "cached":
            assert stats["feature_cache"]["misses"] == 2 and stats["feature_cache"]["hits"] == 3
            assert stats["prefix_cache"]["hits"] >= 3 and stats["prefix_tokens_reused"] >= 3 * 2 * BLOCK
        elif name == "uncached":
            assert stats["feature_cache"]["entries"] == 0 and stats["prefix_tokens_reused"] == 0
    assert answers["cached"] == answers["uncached"] == answers["static"]
    assert answers["cached"][0] == alone(tiny, "What colour?", red, 24)


def test_feature_cache_keys_change_with_image_processor_and_weights(tiny):
    model, processor = tiny
    red = load_image(base64.b64decode(png_data_uri((200, 30, 30)).split(",", 1)[1]))
    nearly = load_image(base64.b64decode(png_data_uri((200, 30, 31)).split(",", 1)[1]))

    def processed(proc, image):
        return proc.encode_prompt([Message("user", "<image>\nx")], [image]).images[0]

    w = weights_key(model)
    key = image_key(processed(processor, red), w)
    assert key == image_key(processed(processor, red), w)  # the same image sent again
    assert key != image_key(processed(processor, nearly), w)  # one pixel value differs
    other_mean = build_chat_processor(model, 512)
    other_mean.image_processor.mean = (0.4, 0.5, 0.5)
    assert key != image_key(processed(other_mean, red), w)  # a processor setting differs
    other_model, _ = tiny_model(seed=1)
    w_other = weights_key(other_model)
    assert w_other != w and key != image_key(processed(processor, red), w_other)

    # One cache shared by two checkpoints: the second never reads the first's tokens.
    cache = FeatureCache(1 << 20, w)
    image = processed(processor, red)
    ours = cache.image_tokens(model, [image], [key])[0]
    theirs = cache.image_tokens(other_model, [image], [image_key(image, w_other)])[0]
    assert cache.lru.stats()["misses"] == 2 and not bool((ours == theirs).all())
    assert bool((theirs == other_model.image_tokens([image])[0]).all())


def test_prefix_digests_part_ways_at_the_image_and_at_the_text():
    cache = PrefixCache(1 << 20, "weights-a")
    ids = list(range(70))
    base = cache.boundaries(ids, [20], ["img-1"])
    assert base == cache.boundaries(ids, [20], ["img-1"]) and len(base) == 70 // BLOCK
    other_image = cache.boundaries(ids, [20], ["img-2"])
    assert other_image[0] == base[0] and other_image[1:] != base[1:] and not set(other_image[1:]) & set(base)
    other_text = cache.boundaries(ids[:40] + [999] + ids[41:], [20], ["img-1"])
    assert other_text[:2] == base[:2] and not set(other_text[2:]) & set(base)
    assert not set(PrefixCache(1 << 20, "weights-b").boundaries(ids, [20], ["img-1"])) & set(base)


def test_prefix_cache_serves_shorter_prefixes_and_stays_bounded():
    import torch

    cache = PrefixCache(3 * 4 * 2 * 64 * 4 + 1, "w")  # room for one 64-token entry of one layer
    ids = list(range(64))
    digests = cache.boundaries(ids, [], [])
    keys = torch.arange(3 * 64 * 4, dtype=torch.float32).view(3, 64, 4)
    cache.store(digests, [(keys, keys + 1)])
    length, layers = cache.lookup(cache.boundaries(ids[:40] + [7, 7], [], []))
    assert length == 2 * BLOCK and torch.equal(layers[0][0], keys[:, :32]) and torch.equal(layers[0][1], keys[:, :32] + 1)
    cache.store(cache.boundaries([5] * 64, [], []), [(keys, keys)])  # evicts the first
    assert cache.lookup(digests) == (0, None) and len(cache.lru) == 1


def test_byte_lru_evicts_least_recently_used():
    lru = ByteLRU(10)
    lru.put("a", 1, 4)
    lru.put("b", 2, 4)
    assert lru.get("a") == 1
    lru.put("c", 3, 4)  # over budget: "b" was used least recently
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    lru.put("huge", 4, 11)
    assert lru.get("huge") is None and lru.bytes == 8


def test_int8_server_loads_and_answers():
    pytest.importorskip("torchao")
    from vlmkit.serve.quantize import quantize_weights

    model, processor = tiny_model()
    full = alone((model, processor), "What colour?", png_data_uri(), 12)
    quantize_weights(model, "int8")
    assert type(model.llm.base_model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(model.llm.get_output_embeddings().weight).__name__ == "Parameter"  # the head stays in float
    with running_server(create_app(model, processor, ServerSettings(model_name=MODEL))) as base:
        answer = ask(client_for(base), "What colour?", png_data_uri(), 12)
        again = ask(client_for(base), "What colour?", png_data_uri(), 12)
    assert answer == again and len(answer) > 0
    assert answer[:3] == full[:3]  # the sharpened tiny model's first tokens survive int8 rounding


def test_quantize_without_torchao_is_one_clear_error(monkeypatch, tiny):
    import builtins

    from vlmkit.serve.quantize import QuantizationError, quantize_weights

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(QuantizationError, match=r"pip install 'vlmkit\[serve-int8\]'"):
        quantize_weights(tiny[0], "int8")
    with pytest.raises(QuantizationError, match="unknown mode"):
        quantize_weights(tiny[0], "int4")


@pytest.mark.parametrize("option, value", [("--batching", "eventually"), ("--quantize", "int4")])
def test_serve_refuses_unknown_batching_or_quantize_mode_before_loading(tmp_path, option, value):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "none"), "--port", "0", option, value])
    assert result.exit_code == 2 and value in result.output and "Traceback" not in result.output
