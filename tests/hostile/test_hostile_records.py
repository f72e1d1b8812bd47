"""Hostile and careless training records, SFT and DPO, in both `on_bad_record` modes: each is a
BadRecordError that names the record (error mode) or one skipped record (skip mode), never a
crash, a stringified value, or an image token trained as a target."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from _tiny import tiny_config
from PIL import Image

from vlmkit.data.formats import BadRecordError, read_llava_records
from vlmkit.model.vlm import IGNORE_INDEX, VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.train.loop import encode_all, encode_pairs

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.fixture(scope="module")
def proc():
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)
    return build_chat_processor(model, 256)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    (root / "ghost.png").write_bytes(EPS)
    (root / "cut.png").write_bytes((root / "red.png").read_bytes()[:60])
    (root / "folder.png").mkdir()
    return root


def turn(speaker, value):
    return {"from": speaker, "value": value}


GOOD_SFT = {"id": "good", "image": "red.png", "conversations": [turn("human", "<image>\nWhat colour?"), turn("gpt", "Red.")]}
RED_URI = None  # filled lazily (needs the media folder)


def sft(**changes):
    return {**GOOD_SFT, "id": "bad", **changes}


def msgs(*messages, **extra):
    return {"id": "bad", "messages": list(messages), **extra}


# name -> (record, reason regex, the id the error names)
SFT_CASES = {
    "record is a list": ([1, 2], "record is not an object", "#1"),
    "record is a string": ("hello", "record is not an object", "#1"),
    "record is null": (None, "record is not an object", "#1"),
    "missing conversations": ({"id": "bad", "image": "red.png"}, "missing or empty 'conversations'", "bad"),
    "empty conversations": (sft(conversations=[]), "missing or empty 'conversations'", "bad"),
    "conversations an object": (sft(conversations={"from": "human"}), "missing or empty 'conversations'", "bad"),
    "turn not an object": (sft(conversations=["<image> hi", turn("gpt", "x")]), "turn 0 needs 'from' and 'value'", "bad"),
    "turn without value": (sft(conversations=[{"from": "human"}, turn("gpt", "x")]), "turn 0 needs 'from' and 'value'", "bad"),
    "speaker bot": (sft(conversations=[turn("human", "<image> q"), turn("bot", "x")]), "turn 1 has unknown speaker 'bot'", "bad"),
    "speaker a number": (sft(conversations=[turn(1, "<image> q"), turn("gpt", "x")]), "turn 0 has unknown speaker 1", "bad"),
    "speaker a list": (sft(conversations=[turn(["human"], "<image> q"), turn("gpt", "x")]), "turn 0 has unknown speaker", "bad"),
    "value 123": (sft(conversations=[turn("human", "<image> q"), turn("gpt", 123)]), "turn 1 'value' must be a string, got int", "bad"),
    "value null": (sft(conversations=[turn("human", "<image> q"), turn("gpt", None)]), "turn 1 'value' must be a string, got NoneType", "bad"),
    "value a dict": (sft(conversations=[turn("human", "<image> q"), turn("gpt", {"text": "A"})]), "must be a string, got dict", "bad"),
    "value a list": (sft(conversations=[turn("human", ["<image>", "q"]), turn("gpt", "x")]), "turn 0 'value' must be a string, got list", "bad"),
    "value true": (sft(conversations=[turn("human", "<image> q"), turn("gpt", True)]), "must be a string, got bool", "bad"),
    "lone surrogate in value": (sft(conversations=[turn("human", "<image> q \ud800"), turn("gpt", "x")]), "lone UTF-16 surrogate", "bad"),
    "image: 5": (sft(image=5), "'image' must be a path or a list of paths", "bad"),
    "image list with a number": (sft(image=["red.png", 7]), "'image' must be a path or a list of paths", "bad"),
    "image file missing": (sft(image="nope.png"), "nope.png: image file not found", "bad"),
    "image is a folder": (sft(image="folder.png"), "folder.png: image file not found", "bad"),
    "eps named png": (sft(image="ghost.png"), "ghost.png: cannot decode image: not an image in an allowed format", "bad"),
    "truncated png": (sft(image="cut.png"), "cut.png: cannot decode", "bad"),
    "image without a placeholder": (sft(conversations=[turn("human", "q"), turn("gpt", "x")]), "has 1 image.*0 <image> placeholder", "bad"),
    "two placeholders one image": (sft(conversations=[turn("human", "<image><image> q"), turn("gpt", "x")]), "has 1 image.*2 <image> placeholder", "bad"),
    "image placeholder in the assistant turn": (sft(conversations=[turn("human", "q"), turn("gpt", "<image> red")]), "assistant turn 1 holds the placeholder '<image>'", "bad"),
    "image_k placeholder in the assistant turn": (sft(conversations=[turn("human", "<image_1> q"), turn("gpt", "see <image_1>")]), "assistant turn 1 holds the placeholder '<image_1>'", "bad"),
    "video placeholder in the assistant turn": (sft(image=None, conversations=[turn("human", "q"), turn("gpt", "<video>")]), "assistant turn 1 holds the placeholder '<video>'", "bad"),
    "assistant turn first": (sft(conversations=[turn("gpt", "Hello"), turn("human", "<image> q"), turn("gpt", "x")]), "starts with an assistant turn", "bad"),
    "no assistant turn": (sft(conversations=[turn("human", "<image> q")]), "has no assistant turn", "bad"),
    "longer than the context": (sft(conversations=[turn("human", "<image> " + "word " * 400), turn("gpt", "x")]), "longer than the context", "bad"),
    "id is a dict": ({**GOOD_SFT, "id": {"x": 1}, "image": 5}, "'image' must be a path", "#1"),
    "messages content a number": (msgs({"role": "user", "content": 5}, {"role": "assistant", "content": "x"}), "message 0 content must be a string or a list", "bad"),
    "messages text part text null": (msgs({"role": "user", "content": [{"type": "text", "text": None}]}, {"role": "assistant", "content": "x"}), "text part's 'text' must be a string, got NoneType", "bad"),
    "messages text part text a number": (msgs({"role": "user", "content": [{"type": "text", "text": 3}]}, {"role": "assistant", "content": "x"}), "must be a string, got int", "bad"),
    "messages unknown part type": (msgs({"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}), "part of unknown type 'audio'", "bad"),
    "messages role tool": (msgs({"role": "tool", "content": "x"}, {"role": "assistant", "content": "x"}), "message 0 has unknown role 'tool'", "bad"),
    "messages role a dict": (msgs({"role": {"r": 1}, "content": "x"}, {"role": "assistant", "content": "x"}), "message 0 has unknown role", "bad"),
    "messages remote image": (msgs({"role": "user", "content": [{"type": "image", "image": "https://example.com/a.png"}, {"type": "text", "text": "q"}]}, {"role": "assistant", "content": "x"}), "remote image", "bad"),
    "messages data uri not base64": (msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}, {"role": "assistant", "content": "x"}), "not valid base64", "bad"),
    "messages data uri of eps": (msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(EPS).decode()}}]}, {"role": "assistant", "content": "x"}), "not an image in an allowed format", "bad"),
    "messages empty": (msgs(), "missing or empty 'messages'", "bad"),
}


def write(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("name", list(SFT_CASES))
def test_bad_sft_record_error_mode_names_it(proc, media, name):
    record, reason, rid = SFT_CASES[name]
    path = write(media / f"sft-{abs(hash(name))}.json", [GOOD_SFT, record, GOOD_SFT])
    with pytest.raises(BadRecordError, match=reason) as info:
        encode_all(proc, read_llava_records(path), "error", "sft")
    assert info.value.record_id == rid
    assert f"record {rid!r}" in str(info.value)


@pytest.mark.parametrize("name", list(SFT_CASES))
def test_bad_sft_record_skip_mode_skips_just_it(proc, media, name):
    record, _, rid = SFT_CASES[name]
    path = write(media / f"sft-skip-{abs(hash(name))}.json", [GOOD_SFT, record, GOOD_SFT])
    encoded, skipped = encode_all(proc, read_llava_records(path), "skip", "sft")
    assert [s.id for s in encoded] == ["good", "good"]
    assert [r for r, _ in skipped] == [rid]
    # The good records still train on their answers only, never on image tokens.
    for s in encoded:
        assert (s.labels[s.input_ids == proc.tokenizer.convert_tokens_to_ids(proc.image_token)] == IGNORE_INDEX).all()
        assert (s.labels != IGNORE_INDEX).any()


def test_skip_counts_records_not_ids(proc, media):
    bad = sft(image=5)
    path = write(media / "dup.json", [GOOD_SFT, bad, bad, {**bad, "conversations": []}])
    _, skipped = encode_all(proc, read_llava_records(path), "skip", "sft")
    assert len(skipped) == 3 and {r for r, _ in skipped} == {"bad"}


def test_jsonl_line_that_is_not_json_is_a_skippable_record(proc, media):
    path = media / "lines.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n{not json\n" + "[" * 5000 + "\n" + json.dumps(GOOD_SFT) + "\n")
    with pytest.raises(BadRecordError, match=r"lines.jsonl: record 'line 2': not valid JSON"):
        encode_all(proc, read_llava_records(path), "error", "sft")
    encoded, skipped = encode_all(proc, read_llava_records(path), "skip", "sft")
    assert len(encoded) == 2 and [r for r, _ in skipped] == ["line 2", "line 3"]


def test_all_records_bad_is_a_clear_stage_error(proc, media):
    path = write(media / "allbad.json", [sft(image=5), sft(conversations=[])])
    with pytest.raises(ValueError, match=r"no usable records \(2 skipped\)"):
        encode_all(proc, read_llava_records(path), "skip", "sft")


# ---- DPO ----------------------------------------------------------------------------------------

GOOD_RLAIF = {"id": "good", "image": "red.png", "question": "What colour?", "chosen": "Red.", "rejected": "Blue."}
GOOD_RLHF = {"id": "good", "image": "red.png", "conversations": [turn("human", "<image>\nWhat colour?")],
             "output_1": {"value": "Red."}, "output_2": {"value": "Blue."}, "preference": 1}
GOOD_TRL = {"id": "good", "images": ["red.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
            "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue."}]}


def rlaif(**c):
    return {**GOOD_RLAIF, "id": "bad", **c}


def rlhf(**c):
    return {**GOOD_RLHF, "id": "bad", **c}


def trl(**c):
    return {**GOOD_TRL, "id": "bad", **c}


DPO_CASES = {
    "rlaif chosen a number": (rlaif(chosen=42), "RLAIF-V 'chosen' must be a string, got int", "bad"),
    "rlaif rejected a dict": (rlaif(rejected={"text": "x"}), "RLAIF-V 'rejected' must be a string, got dict", "bad"),
    "rlaif chosen a list": (rlaif(chosen=["Red."]), "RLAIF-V 'chosen' must be a string, got list", "bad"),
    "rlaif question a number": (rlaif(question=7), "RLAIF-V 'question' must be a string, got int", "bad"),
    "rlaif chosen whitespace": (rlaif(chosen="   "), "empty 'chosen' response", "bad"),
    "rlaif surrogate in rejected": (rlaif(rejected="x\udc00"), "lone UTF-16 surrogate", "bad"),
    "rlaif chosen holds an image placeholder": (rlaif(chosen="<image> red"), "assistant turn 1 holds the placeholder", "bad/chosen"),
    "rlhf preference 2.7": (rlhf(preference=2.7), "'preference' must be 1 or 2, got 2.7", "bad"),
    "rlhf preference true": (rlhf(preference=True), "'preference' must be 1 or 2, got True", "bad"),
    "rlhf preference '3'": (rlhf(preference="3"), "'preference' must be 1 or 2, got '3'", "bad"),
    "rlhf preference a list": (rlhf(preference=[1]), "'preference' must be 1 or 2", "bad"),
    "rlhf output_1 a number": (rlhf(output_1=5), "'output_1' has no response text", "bad"),
    "rlhf output_2 value a dict": (rlhf(output_2={"value": {"t": 1}}), "'output_2' has no response text", "bad"),
    "rlhf conversations end with gpt": (rlhf(conversations=[turn("human", "<image> q"), turn("gpt", "a")]), "must end with the human turn", "bad"),
    "rlhf conversations value a number": (rlhf(conversations=[turn("human", 5)]), "turn 0 'value' must be a string", "bad"),
    "trl missing rejected": ({k: v for k, v in trl().items() if k != "rejected"}, r"missing \['rejected'\]", "bad"),
    "trl chosen from the user": (trl(chosen=[{"role": "user", "content": "Red."}]), "'chosen' must hold assistant message", "bad"),
    "trl prompt holds a non-object": (trl(prompt=["hi"]), "'prompt' messages need 'role' and 'content'", "bad"),
    "trl text part text a number": (trl(prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": 1}]}]), "must be a string, got int", "bad"),
    "trl image a number": (trl(images=[3]), "images must be file paths", "bad"),
    "ref logp a string": (rlaif(ref_chosen_logp="-1.5", ref_rejected_logp=-2.0), "reference log-probs must be finite numbers", "bad"),
    "ref logp NaN": (rlaif(ref_chosen_logp=float("nan"), ref_rejected_logp=-2.0), "reference log-probs must be finite numbers", "bad"),
    "ref logp one side only": (rlaif(ref_chosen_logp=-1.0), "one reference log-prob but not the other", "bad"),
    "record a number": (5, "record is not an object", "#1"),
    "no known format": ({"id": "bad", "text": "hi"}, "not a preference record in any known format", "bad"),
    "image missing": (rlaif(image="nope.png"), "nope.png: image file not found", "bad/chosen"),
}


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_bad_dpo_record_error_mode_names_it(proc, media, name):
    record, reason, rid = DPO_CASES[name]
    path = write(media / f"dpo-{abs(hash(name))}.json", [GOOD_RLAIF, record, GOOD_RLHF, GOOD_TRL])
    with pytest.raises(BadRecordError, match=reason) as info:
        encode_pairs(proc, str(path), "error", "dpo")
    assert info.value.record_id == rid


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_bad_dpo_record_skip_mode_skips_just_it(proc, media, name):
    record, _, rid = DPO_CASES[name]
    path = write(media / f"dpo-skip-{abs(hash(name))}.json", [GOOD_RLAIF, record, GOOD_RLHF, GOOD_TRL])
    units, refs, skipped = encode_pairs(proc, str(path), "skip", "dpo")
    assert len(units) == 3 and len(refs) == 3
    assert [r for r, _ in skipped] == [rid]


def test_rlhf_integral_preferences_in_other_spellings_are_read(proc, media):
    from vlmkit.data.preference import read_preference_file

    path = write(media / "prefs.json", [rlhf(id="a", preference="2"), rlhf(id="b", preference=2.0), rlhf(id="c", preference=1)])
    pairs = read_preference_file(path)
    assert [p.chosen for p in pairs] == ["Blue.", "Blue.", "Red."]
