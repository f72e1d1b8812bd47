"""Several images and videos per sample: both record styles, sentinels, token groups, errors."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.formats import BadRecordError, Message, Sample, read_llava_json
from vlmkit.processing.fixed import FixedResizeProcessor
from vlmkit.processing.prompt import ChatProcessor
from vlmkit.processing.video import VideoInput, VideoOptions, write_video
from vlmkit.tokenizer import byte_level_tokenizer

TOKENS = 4


@pytest.fixture(scope="module")
def proc():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return ChatProcessor(tok, FixedResizeProcessor(16, TOKENS, fit="squash"), "<image>", 2048,
                         video=VideoOptions(num_frames=3))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for name, grey in (("a.png", 10), ("b.png", 200), ("c.png", 120)):
        Image.new("RGB", (20, 16), (grey,) * 3).save(d / name)
    write_video(d / "clip.webm", [np.full((16, 16, 3), 30 * i, np.uint8) for i in range(6)], fps=6)
    return d


def decoded(proc, enc) -> str:
    return proc.tokenizer.decode(enc.input_ids.tolist())


def test_llava_and_content_parts_records_encode_identically(proc, media):
    llava = {"id": "l", "image": ["a.png", "b.png"], "video": "clip.webm", "conversations": [
        {"from": "human", "value": "<image>vs<image>, then <video>?"}, {"from": "gpt", "value": "yes"}]}
    data_uri = "data:image/png;base64," + base64.b64encode((media / "b.png").read_bytes()).decode()
    parts = {"id": "p", "images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"},
                                     {"type": "image_url", "image_url": {"url": data_uri}},
                                     {"type": "text", "text": ", then "}, {"type": "video", "video": "clip.webm"},
                                     {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]}
    (media / "mixed.jsonl").write_text(json.dumps(llava) + "\n" + json.dumps(parts) + "\n")
    a, b = read_llava_json(media / "mixed.jsonl")
    assert isinstance(b.images[1], bytes) and b.videos == [media / "clip.webm"]
    ea, eb = proc.encode(a), proc.encode(b)
    assert torch.equal(ea.input_ids, eb.input_ids) and torch.equal(ea.labels, eb.labels)
    assert len(ea.images) == len(eb.images) and all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(ea.images, eb.images))
    # 2 images + 3 frames = 5 token groups, each with its own pixel row, layout and cache key
    assert sum(im.pixel_values.shape[0] for im in ea.images) == len(ea.layouts) == len(ea.image_keys) == 5
    assert len(set(ea.image_keys)) == 5
    assert [(v.kind, v.index, v.groups) for v in ea.visuals] == [("image", 1, 1), ("image", 2, 1), ("video", 1, 3)]
    assert ea.visuals[2].timestamps == pytest.approx([0.0, 2 / 6, 5 / 6], abs=2e-3)  # frames 0, 2, 5 (WebM: ms)
    text = decoded(proc, ea)
    img = "<image>" * TOKENS
    assert f"<image_1>{img}vs<image_2>{img}, then <video_1>{img * 3}?" in text


def test_group_order_follows_the_text(proc, media):
    """Named placeholders may reorder images: pixel rows follow the order of the token groups."""
    fwd = proc.encode(Sample("f", [Message("user", "<image_1> <image_2>"), Message("assistant", "x")],
                             [media / "a.png", media / "b.png"]))
    rev = proc.encode(Sample("r", [Message("user", "<image_2> <image_1>"), Message("assistant", "x")],
                             [media / "a.png", media / "b.png"]))
    assert torch.equal(torch.cat([im.pixel_values for im in fwd.images]), torch.cat([im.pixel_values for im in rev.images]).flip(0))
    assert decoded(proc, rev).index("<image_2>") < decoded(proc, rev).index("<image_1>")
    assert [v.index for v in rev.visuals] == [2, 1]


def test_single_image_has_no_sentinel_unless_asked(proc, media):
    one = Sample("s", [Message("user", "<image>hi"), Message("assistant", "x")], [media / "a.png"])
    assert "<image_1>" not in decoded(proc, proc.encode(one))
    always = ChatProcessor(proc.tokenizer, proc.image_processor, "<image>", 2048, sentinels="always")
    assert "<image_1>" in decoded(proc, always.encode(one))


def test_encode_prompt_takes_videos_and_matches_training(proc, media):
    train = proc.encode(Sample("t", [Message("user", "<image><video>Q"), Message("assistant", "A")],
                               [media / "c.png"], [media / "clip.webm"]))
    # a generic caller puts one `<image>` per visual input; the input decides how it expands
    prompt = proc.encode_prompt([Message("user", "<image><image>Q")], [media / "c.png", VideoInput(media / "clip.webm")])
    n = len(prompt.input_ids)
    assert torch.equal(train.input_ids[:n], prompt.input_ids)
    assert torch.equal(torch.cat([im.pixel_values for im in train.images]), torch.cat([im.pixel_values for im in prompt.images]))


@pytest.mark.parametrize("text,images,videos,match", [
    ("<image><image>", 1, 0, "has 1 image\\(s\\) but 2 <image> placeholder"),
    ("<image>", 2, 0, "has 2 image\\(s\\) but 1 <image> placeholder"),
    ("no placeholder", 1, 0, "has 1 image\\(s\\) but 0"),
    ("<video>", 0, 0, "has 0 video\\(s\\) but 1 <video>"),
    ("<image> <image_2>", 2, 0, "mixes <image> and <image_k>"),
    ("<image_1> <image_1>", 2, 0, "1..2 once"),
    ("<image_3> <image_1>", 2, 0, "check \\[3\\]"),
])
def test_placeholder_mismatches_name_the_record(proc, media, text, images, videos, match):
    sample = Sample("rec-7", [Message("user", text), Message("assistant", "x")],
                    [media / "a.png"] * images, [media / "clip.webm"] * videos)
    with pytest.raises(BadRecordError, match="rec-7") as e:
        proc.encode(sample)
    assert e.match(match)


def test_bad_videos_and_content_parts_are_record_errors(proc, media, tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 100)
    sample = Sample("vid-3", [Message("user", "<video>"), Message("assistant", "x")], [], [tmp_path / "bad.mp4"])
    with pytest.raises(BadRecordError, match="vid-3.*bad.mp4.*corrupt or truncated"):
        proc.encode(sample)
    short = Sample("vid-4", [Message("user", "<video>"), Message("assistant", "x")], [], [media / "clip.webm"])
    many = ChatProcessor(proc.tokenizer, proc.image_processor, "<image>", 2048, video=VideoOptions(num_frames=9))
    with pytest.raises(BadRecordError, match="vid-4.*has 6 frame\\(s\\), fewer than the 9"):
        many.encode(short)
    recs = [{"id": "u", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
            {"id": "v", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            {"id": "w", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}]
    for rec, match in zip(recs, ["remote image", "more image parts without a path", "unknown type 'audio'"]):
        (tmp_path / "r.json").write_text(json.dumps([rec]))
        with pytest.raises(BadRecordError, match=match):
            read_llava_json(tmp_path / "r.json")
