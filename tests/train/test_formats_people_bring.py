"""The formats people bring: LLaVA, LLaMA-Factory sharegpt and alpaca, ms-swift `messages` and
OpenAI content parts, each recognised per record without a flag and read into the same `Sample`
(and the same encoded tokens) as the equivalent LLaVA record; a missing image is named by
`recipe --check` with its record, field, line and absolute path, whatever the format; a record
whose shape is ambiguous or unknown is refused with the formats it could be."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests._tiny import tiny_config
from vlmkit.cli import app
from vlmkit.data.formats import BadRecordError, Message, Sample, read_llava_records, record_to_sample
from vlmkit.data.sources import open_source

ASK, ANSWER, FOLLOW, LAST = "<image>\n<image>Which is red?", "The left one.", "And in <video>?", "Blue."


def llava(rid="r"):
    return {"id": rid, "image": ["a.png", "b.png"], "video": "clip.mp4", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": ASK}, {"from": "gpt", "value": ANSWER},
        {"from": "human", "value": FOLLOW}, {"from": "gpt", "value": LAST}]}


def sharegpt(rid="r"):
    return {"id": rid, "system": "Be brief.", "images": ["a.png", "b.png"], "videos": ["clip.mp4"], "conversations": [
        {"from": "human", "value": ASK}, {"from": "gpt", "value": ANSWER},
        {"from": "human", "value": FOLLOW}, {"from": "gpt", "value": LAST}]}


def swift(rid="r"):
    return {"id": rid, "images": ["a.png", "b.png"], "videos": ["clip.mp4"], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}, {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": FOLLOW}, {"role": "assistant", "content": LAST}]}


def openai_parts(rid="r"):
    return {"id": rid, "images": ["a.png"], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"},
                                     {"type": "image_url", "image_url": {"url": "file://b.png"}},
                                     {"type": "text", "text": "Which is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
        {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "video", "video": "clip.mp4"},
                                     {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": LAST}]}


def alpaca(rid="r"):
    return {"id": rid, "system": "Be brief.", "history": [[ASK, ANSWER]], "instruction": FOLLOW, "input": "",
            "output": LAST, "images": ["a.png", "b.png"], "videos": ["clip.mp4"]}


FORMATS = {"sharegpt": sharegpt, "messages (ms-swift)": swift, "openai content parts": openai_parts, "alpaca": alpaca}


def test_every_format_reads_into_the_llava_sample(tmp_path):
    # All five side by side in one JSONL file: each record's format is told from its own keys.
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(make(name)) + "\n" for name, make in [("llava", llava), *FORMATS.items()]))
    expected = Sample("llava", [Message("system", "Be brief."), Message("user", ASK), Message("assistant", ANSWER),
                                Message("user", FOLLOW), Message("assistant", LAST)],
                      [tmp_path / "a.png", tmp_path / "b.png"], [tmp_path / "clip.mp4"])
    samples = read_llava_records(path)
    assert samples[0] == expected
    for name, sample in zip(FORMATS, samples[1:]):
        assert sample == Sample(name, expected.messages, expected.images, expected.videos), name


def test_sharegpt_and_llava_encode_to_the_same_tokens(tmp_path):
    """Not only the same Sample: the processor turns both into the same ids and labels."""
    import torch

    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.processing import build_chat_processor

    torch.manual_seed(0)
    proc = build_chat_processor(VisionLanguageModel.build(tiny_config("mlp"), pretrained=False), 512)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    a = proc.encode(record_to_sample({"id": "x", "image": "red.png", "conversations": turns}, 0, tmp_path))
    b = proc.encode(record_to_sample({"id": "x", "images": ["red.png"], "conversations": turns}, 0, tmp_path))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert len(a.images) == len(b.images) == 1


def test_sharegpt_tool_turns_and_system_turn():
    record = {"id": "t", "conversations": [
        {"from": "system", "value": "You may call tools."}, {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
        {"from": "observation", "value": '{"sky": "clear"}'}, {"from": "gpt", "value": "Clear."}]}
    sample = record_to_sample(record, 0, Path("."))
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.messages[2].content == '{"name": "weather", "arguments": {}}'
    assert sample.images == [] and sample.videos == []


def test_alpaca_joins_instruction_and_input():
    sample = record_to_sample({"instruction": "<image>Describe.", "input": "In one word.", "output": "Cat.",
                               "images": ["cat.png"]}, 4, Path("/data"))
    assert sample.id == "#4"
    assert sample.messages == [Message("user", "<image>Describe.\nIn one word."), Message("assistant", "Cat.")]
    assert sample.images == [Path("/data/cat.png")]


def test_tar_shards_read_sharegpt_and_llava_alike(tmp_path):
    """A WebDataset shard's KEY.json in sharegpt form (a `system` key) takes its images from the
    shard's members just as a LLaVA KEY.json does."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    turns = [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Blue."}]
    members = {"a.json": json.dumps({"conversations": turns}).encode(), "a.png": buf.getvalue(),
               "b.json": json.dumps({"system": "Short answers.", "conversations": turns}).encode(), "b.png": buf.getvalue()}
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source(tmp_path / "shard.tar")
    a, b = source.record(0), source.record(1)
    assert a.images == b.images == [buf.getvalue()]
    assert b.messages == [Message("system", "Short answers."), *a.messages]


def test_parquet_rows_read_sharegpt_and_alpaca(tmp_path):
    """LLaMA-Factory columns in a parquet shard (images embedded): sharegpt's `system` and
    alpaca's `instruction` / `output` are read, not dropped."""
    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buf, format="PNG")
    image = [{"bytes": buf.getvalue(), "path": None}]
    turns = [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Green."}]
    for name, table in {"sharegpt": {"conversations": [turns], "system": ["Short."], "images": [image]},
                        "alpaca": {"instruction": ["<image>Colour?"], "output": ["Green."], "system": ["Short."], "images": [image]}}.items():
        (tmp_path / name).mkdir()
        ds = datasets.Dataset.from_dict(table).cast_column("images", datasets.Sequence(datasets.Image()))
        ds.to_parquet(str(tmp_path / name / "train-00000.parquet"))
        sample = open_source(tmp_path / name).record(0)
        assert sample.messages == [Message("system", "Short."), Message("user", "<image>Colour?"), Message("assistant", "Green.")], name
        assert sample.images == [buf.getvalue()]


# ---- refused shapes -----------------------------------------------------------------------------

TURNS = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]
REFUSED = {
    "image and images": ({"id": "x", "image": "a.png", "images": ["a.png"], "conversations": TURNS},
                         r"could be LLaVA \(it has 'image'\) or sharegpt \(LLaMA-Factory\) \(it has 'images'\)"),
    "messages and conversations": ({"id": "x", "messages": [{"role": "user", "content": "q"}], "conversations": TURNS},
                                   r"could be messages .* or LLaVA"),
    "alpaca and conversations": ({"id": "x", "instruction": "q", "output": "a", "conversations": TURNS},
                                 r"could be LLaVA .* or alpaca"),
    "images alone": ({"id": "x", "images": ["a.png"], "question": "q"},
                     r"is in no format vlmkit reads \(its keys: 'id', 'images', 'question'\); it could be sharegpt"),
    "no known key": ({"id": "x", "prompt": "q", "answer": "a"}, r"it could be LLaVA.*sharegpt.*messages.*alpaca"),
    "sharegpt tools": ({"id": "x", "tools": '[{"name": "f"}]', "conversations": TURNS}, r"has 'tools', which would be dropped"),
    "sharegpt audios": ({"id": "x", "audios": ["a.wav"], "conversations": TURNS}, r"not audio"),
    "sharegpt late system turn": ({"id": "x", "images": [], "conversations": [*TURNS, {"from": "system", "value": "s"}]},
                                  r"turn 2 is a system turn; only the first turn may be"),
    "sharegpt two systems": ({"id": "x", "system": "s", "conversations": [{"from": "system", "value": "t"}, *TURNS]},
                             r"both a 'system' key and a first system turn"),
    "sharegpt unknown tag": ({"id": "x", "images": ["a.png"], "conversations": [{"from": "bot", "value": "a"}]},
                             r"turn 0 has unknown speaker 'bot'"),
    "alpaca without output": ({"id": "x", "instruction": "q", "images": ["a.png"]}, r"no 'output'"),
    "alpaca without prompt": ({"id": "x", "instruction": "", "output": "a"}, r"no prompt"),
    "alpaca bad history": ({"id": "x", "instruction": "q", "output": "a", "history": [["only one"]]}, r"history\[0\] must be"),
    "sharegpt images a number": ({"id": "x", "images": 5, "conversations": TURNS}, r"'images' must be a path or a list"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_shapes_are_refused_naming_the_record(name):
    record, reason = REFUSED[name]
    with pytest.raises(BadRecordError, match=reason) as info:
        record_to_sample(record, 0, Path("."), "data.json")
    assert info.value.record_id == "x"
    assert str(info.value).startswith("data.json: record 'x': ")


# ---- recipe --check, through the CLI ------------------------------------------------------------

def project(tmp_path: Path, records: list[dict]) -> Path:
    """A recipe (tiny random model, never loaded by --check) over a JSONL file of `records`."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / name)
    (tmp_path / "clip.mp4").write_bytes(b"not decoded by --check")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {"model": tiny_config("mlp").model_dump(mode="json", exclude_none=True),
              "train": {"output_dir": str(tmp_path / "runs"),
                        "stages": {"sft": {"data": "data.jsonl", "trainable": ["connector"], "lr": 1.0e-3}}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def check(recipe: Path):
    return CliRunner().invoke(app, ["recipe", "--check", str(recipe)])


def test_recipe_check_passes_every_format(tmp_path):
    records = [llava("llava"), *(make(name) for name, make in FORMATS.items())]
    result = check(project(tmp_path, records))
    assert result.exit_code == 0, result.output
    assert f"stage sft: 5 records in {tmp_path / 'data.jsonl'}" in result.output


def test_recipe_check_names_each_missing_image_with_field_line_and_path(tmp_path):
    def gone(record, key):  # the second image is gone
        record[key] = [p.replace("b.png", "gone.png") for p in record[key]]
        return record

    parts = openai_parts("openai")
    parts["messages"][1]["content"][2]["image_url"]["url"] = "file://gone.png"
    video = {**alpaca("alpaca"), "videos": "gone.mp4"}  # one path, not a list: the field is 'videos'
    records = [llava("fine"), gone(llava("llava"), "image"), gone(sharegpt("sharegpt"), "images"), gone(swift("swift"), "images"),
               parts, video]
    result = check(project(tmp_path, records))
    assert result.exit_code == 2, result.output
    # The error goes to stderr, which CliRunner mixes into `output`.
    out = result.output
    gone_png, gone_video = tmp_path / "gone.png", tmp_path / "gone.mp4"
    assert "stage 'sft': 5 record(s) of" in out and "name files that do not exist" in out
    assert f"record 'llava': {gone_png} (field 'image[1]') not found (line 2 of data.jsonl)" in out
    assert f"record 'sharegpt': {gone_png} (field 'images[1]') not found (line 3 of data.jsonl)" in out
    assert f"record 'swift': {gone_png} (field 'images[1]') not found (line 4 of data.jsonl)" in out
    assert f"record 'openai': {gone_png} (field 'messages[1].content[2]') not found (line 5 of data.jsonl)" in out
    assert f"record 'alpaca': {gone_video} (field 'videos') not found (line 6 of data.jsonl)" in out
    assert "'fine'" not in out


def test_recipe_check_names_a_missing_sharegpt_image_in_a_json_list(tmp_path):
    """The issue's case: a sharegpt record whose image does not exist used to pass the check."""
    recipe = project(tmp_path, [])
    record = {"conversations": [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A cat."}],
              "images": ["cats/cat-1.jpg"]}
    (tmp_path / "data.jsonl").unlink()
    (tmp_path / "data.json").write_text(json.dumps([sharegpt("ok"), record]))
    tree = yaml.safe_load(recipe.read_text())
    tree["train"]["stages"]["sft"]["data"] = "data.json"
    recipe.write_text(yaml.safe_dump(tree))
    result = check(recipe)
    assert result.exit_code == 2
    assert f"record '#1': {tmp_path / 'cats' / 'cat-1.jpg'} (field 'images[0]') not found (item 2 of data.json)" in result.output


def test_recipe_check_refuses_an_ambiguous_record_by_name(tmp_path):
    bad = {"id": "both", "image": "a.png", "images": ["a.png"], "conversations": TURNS}
    result = check(project(tmp_path, [sharegpt("ok"), bad]))
    assert result.exit_code == 2
    assert "record 'both': has the keys of several formats: it could be LLaVA (it has 'image')" in result.output


def test_the_docs_examples_read_into_one_sample():
    """docs/training.md shows one record of each format and says they read into the same sample."""
    import re

    page = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    section = page[page.index("## Record formats"):page.index("## Bad records")]
    blocks = re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 5
    samples = [record_to_sample(json.loads(b), 0, Path("data")) for b in blocks]
    assert all(s == samples[0] for s in samples[1:])
    assert samples[0].images == [Path("data/images/cat.jpg")] and samples[0].messages[0] == Message("system", "Answer briefly.")
