"""Hostile training data, round 2: a record too big to tokenise, stages where every
record (or too many) is skipped, parquet columns of the wrong kind, NUL bytes in paths, and
WebDataset shards that are cut short, hold a huge member or a key twice. Each is refused with a
message naming the stage, file and record, or skipped and counted in skip mode; none crashes the
process, reads a runaway member, or "trains" on nothing and exits 0."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from _tiny import tiny_config

from vlmkit.config import load_config
from vlmkit.data import sources
from vlmkit.data.formats import BadRecordError, read_llava_records
from vlmkit.data.sources import DataSourceError, open_source
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.train.loop import encode_all, run_training
from vlmkit.train.preflight import DataError, check_stage_data

from test_data_scale import data_dir, recipe  # noqa: F401  (data_dir is a fixture: 16 records as JSON, parquet, WebDataset)
from test_train_scale import build


@pytest.fixture(scope="module")
def proc():
    torch.manual_seed(0)
    return build_chat_processor(VisionLanguageModel.build(tiny_config("mlp"), pretrained=False), 512)


def records(data_dir, n=16):
    return json.loads((data_dir / "stage2.json").read_text())[:n]


def write_json(path: Path, recs) -> Path:
    path.write_text(json.dumps(recs))
    return path


def without_placeholder(r: dict) -> dict:
    """A record the index accepts but encoding refuses (one image, no <image> in the text)."""
    turns = [dict(t) for t in r["conversations"]]
    turns[0]["value"] = turns[0]["value"].replace("<image>", "")
    return {**r, "conversations": turns}


def train(tmp_path, data, tag="run", **train_keys):
    cfg = load_config(recipe(tmp_path / tag, data, train={"on_bad_record": "skip", "feature_cache": False, **train_keys},
                             max_steps=2, batch_size=4))
    return run_training(cfg, model=build(), progress=False)


# ---- a record too big to tokenise --------------------------------------------------------------

class TokenizerSpy:
    """The processor's tokenizer, noting the longest text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.__dict__["inner"], self.__dict__["longest"] = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.__dict__["longest"] = max(self.longest, len(text))
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_huge_record_is_refused_before_the_tokenizer_sees_it(proc, data_dir, monkeypatch):
    """95 MB of text aborted the whole process inside the Rust tokenizer (SIGABRT, 6.2 GB). Text
    that cannot fit the context whatever its tokens is now refused before tokenising."""
    recs = records(data_dir, 3)
    huge = {**recs[1], "id": "huge", "conversations": [{"from": "human", "value": "<image>\n" + "lorem ipsum " * 100_000},
                                                       {"from": "gpt", "value": "x"}]}
    path = data_dir / "huge.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (recs[0], huge, recs[2])) + "\n")
    spy = TokenizerSpy(proc.tokenizer)
    monkeypatch.setattr(proc, "tokenizer", spy)
    with pytest.raises(BadRecordError, match=r"record 'huge': holds 1200009 characters of text, more than a context of 512 "
                                             r"tokens can hold .*not tokenised") as info:
        encode_all(proc, read_llava_records(path), "error", "sft")
    assert info.value.record_id == "huge"
    encoded, skipped = encode_all(proc, read_llava_records(path), "skip", "sft")
    assert [s.id for s in encoded] == [recs[0]["id"], recs[2]["id"]] and [r for r, _ in skipped] == ["huge"]
    assert 0 < spy.longest < 10_000


def test_huge_record_in_lazy_training_is_skipped_counted_and_named(data_dir, tmp_path):
    recs = records(data_dir)
    huge = {**recs[3], "id": "huge", "conversations": [{"from": "human", "value": "<image>\n" + "x" * 2_000_000},
                                                       {"from": "gpt", "value": "x"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs + [huge]) + "\n")
    for r in recs:  # the images resolve against the data file's folder
        (tmp_path / r["image"]).parent.mkdir(exist_ok=True)
        (tmp_path / r["image"]).write_bytes((data_dir / r["image"]).read_bytes())
    cfg = load_config(recipe(tmp_path / "run", str(path), train={"on_bad_record": "skip", "num_workers": 1, "feature_cache": False},
                             max_steps=5, batch_size=4))
    _, (res,) = run_training(cfg, model=build(), progress=False)
    assert len(res.losses) == 5 and sum(loss > 0 for loss in res.losses) >= 4  # one epoch: every record drawn
    assert [rid for rid, _ in res.skipped] == ["huge"] and "data.jsonl: record 'huge': holds 2000009 characters" in res.skipped[0][1]


def test_jsonl_line_over_the_record_limit_is_never_read_whole(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 4096)
    recs = records(data_dir, 2)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"id": "long", "pad": "y" * 50_000}) + "\n" + json.dumps(recs[1]) + "\n")
    source = open_source(path, image_folder=data_dir)
    assert len(source) == 2 and [s.id for s in (source.record(0), source.record(1))] == [recs[0]["id"], recs[1]["id"]]
    (bad,) = source.bad
    assert bad.record_id == "line 2" and "is 50026 bytes long, more than the 4096 bytes a record may take" in bad.message
    listed = tmp_path / "long.json"
    listed.write_text(json.dumps([recs[0], {"id": "long", "pad": "y" * 50_000}, recs[1]]))
    source = open_source(listed, image_folder=data_dir)
    assert len(source) == 2 and [b.record_id for b in source.bad] == ["long"] and source.record(1).id == recs[1]["id"]
    # A list item still unparsed past the limit cannot be stepped over: the file is refused, not read on.
    monkeypatch.setattr(sources._Chunks, "SIZE", 1024)
    with pytest.raises(ValueError, match=r"long\.json: record 1 is more than the 4096 bytes a record may take"):
        open_source(listed, image_folder=data_dir)


# ---- stages with no (or too few) usable records ------------------------------------------------

def test_stage_where_every_record_fails_to_encode_is_refused_not_trained(data_dir, tmp_path):
    """All 8 records skipped used to "train" 2 steps at loss 0.0000, save and exit 0."""
    path = write_json(data_dir / "all-bad.json", [without_placeholder(r) for r in records(data_dir, 8)])
    with pytest.raises(DataError, match=r"stage 'sft': none of the 8 record\(s\) of .*all-bad\.json is usable, "
                                        r"e\.g\. .*all-bad\.json: record 'stage2-\d+': has 1 image"):
        train(tmp_path, str(path), max_skip_fraction=1.0)
    with pytest.raises(DataError, match=r"stage 'sft': 4 of the 8 records of .*all-bad\.json are unusable \(50\.0%\), "
                                        r"more than train\.max_skip_fraction=0\.1 allows"):
        train(tmp_path, str(path), tag="default")
    assert not (tmp_path / "run" / "checkpoints" / "sft" / "meta.json").exists()


def test_stage_whose_steps_meet_no_usable_record_is_refused(data_dir, tmp_path):
    """Lazy input in a worker process: one step of 4 records, all bad, though other records are fine."""
    recs = records(data_dir)
    path = write_json(data_dir / "half-bad.json", [without_placeholder(r) for r in recs[:8]] + recs[8:])
    cfg = load_config(recipe(tmp_path / "run", str(path), max_steps=1, batch_size=16,
                             train={"on_bad_record": "skip", "max_skip_fraction": 1.0, "num_workers": 1, "feature_cache": False}))
    _, (res,) = run_training(cfg, model=build(), progress=False)  # 16 drawn, 8 usable
    assert len(res.skipped) == 8
    # One step of one record, bad; the skip rate allows it, but nothing would be trained.
    only_bad = write_json(data_dir / "four-bad.json", [without_placeholder(r) for r in recs[:4]])
    cfg = load_config(recipe(tmp_path / "run2", str(only_bad), max_steps=1, batch_size=1,
                             train={"on_bad_record": "skip", "max_skip_fraction": 0.9, "num_workers": 1, "feature_cache": False}))
    with pytest.raises(DataError, match=r"stage 'sft': every record drawn from .*four-bad\.json in 1 step\(s\) was unusable, "
                                        r"so nothing was trained, e\.g\. .*has 1 image"):
        run_training(cfg, model=build(), progress=False)
    assert not (tmp_path / "run2" / "checkpoints" / "sft" / "meta.json").exists()


def test_skip_rate_over_the_threshold_is_refused_with_count_fraction_and_key(data_dir, tmp_path):
    recs = records(data_dir)
    mixed = [without_placeholder(r) if i in (1, 6, 11) else r for i, r in enumerate(recs)]
    path = write_json(data_dir / "three-bad.json", mixed)
    cfg = load_config(recipe(tmp_path / "run", str(path), max_steps=4, batch_size=4,
                             train={"on_bad_record": "skip", "num_workers": 1, "feature_cache": False}))
    with pytest.raises(DataError, match=r"stage 'sft': [23] of the 16 records of .*three-bad\.json are unusable \(1\d\.\d%\), "
                                        r"more than train\.max_skip_fraction=0\.1 allows, e\.g\. .*record 'stage2-(1|6|11)'"):
        run_training(cfg, model=build(), progress=False)
    cfg.train.max_skip_fraction = 0.2
    _, (res,) = run_training(cfg, model=build(), progress=False)
    assert sorted(rid for rid, _ in res.skipped) == ["stage2-1", "stage2-11", "stage2-6"]


def test_skip_rate_of_records_ruled_out_while_indexing_is_refused_before_training(data_dir, tmp_path):
    recs = records(data_dir, 8)
    recs[2] = {**recs[2], "image": "images/nope.png"}
    recs[5] = {**recs[5], "conversations": "hello"}
    path = write_json(data_dir / "index-bad.json", recs)
    stage = load_config(recipe(tmp_path, str(path))).train.stages["sft"]
    with pytest.raises(DataError, match=r"2 of the 8 records of .*index-bad\.json are unusable \(25\.0%\), "
                                        r"more than train\.max_skip_fraction=0\.1 allows"):
        check_stage_data("sft", stage, "skip", 0.1)
    assert check_stage_data("sft", stage, "skip", 0.25).unusable == 2


# ---- parquet columns of the wrong kind ---------------------------------------------------------

def _parquet(tmp_path: Path, name: str, table: dict, image_feature=None) -> Path:
    import datasets

    folder = tmp_path / name
    folder.mkdir()
    ds = datasets.Dataset.from_dict(table)
    if image_feature is not None:
        ds = ds.cast_column("images", image_feature)
    ds.to_parquet(str(folder / "train-00000.parquet"))
    return folder


def test_parquet_conversations_as_json_strings_are_read(data_dir, tmp_path):
    import datasets

    recs = records(data_dir, 8)
    images = [[{"bytes": (data_dir / r["image"]).read_bytes(), "path": None}] for r in recs]
    strings = [json.dumps(r["conversations"]) for r in recs]
    strings[3] = "{not json"
    folder = _parquet(tmp_path, "pq", {"id": [r["id"] for r in recs], "conversations": strings, "images": images},
                      datasets.Sequence(datasets.Image()))
    source = open_source(folder)
    assert [m.content for m in source.record(0).messages] == [t["value"] for t in recs[0]["conversations"]]
    with pytest.raises(BadRecordError, match=r"train-00000\.parquet: record 'stage2-3': column 'conversations' is a string but not JSON"):
        source.record(3)
    _, (res,) = train(tmp_path, str(folder), max_skip_fraction=0.2)
    assert all(loss > 0 for loss in res.losses) and [rid for rid, _ in res.skipped] in ([], ["stage2-3"])


def test_parquet_image_column_of_plain_binary_says_what_it_holds(data_dir, tmp_path):
    recs = records(data_dir, 8)
    folder = _parquet(tmp_path, "bin", {"conversations": [r["conversations"] for r in recs],
                                        "images": [(data_dir / r["image"]).read_bytes() for r in recs]})
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"train-00000\.parquet: column 'images' holds binary values, not images; "
                                            r"expected a `datasets` Image column \(structs of \{bytes, path\}\)"):
            train(tmp_path, str(folder), on_bad_record=mode)
    strings = _parquet(tmp_path, "paths", {"conversations": [r["conversations"] for r in recs], "images": [[r["image"]] for r in recs]})
    with pytest.raises(DataSourceError, match=r"column 'images' holds list<\w+: string> values, not images"):
        open_source(strings)


# ---- a NUL byte in a path ----------------------------------------------------------------------

def test_nul_byte_in_an_image_path_is_a_bad_record_not_a_stage_error(data_dir, tmp_path):
    """`embedded null byte` used to stop the whole stage in skip mode, naming no record."""
    recs = records(data_dir, 16)
    recs[4] = {**recs[4], "id": "nul", "image": "images/a\x00b.png"}
    recs[9] = {"id": "nul-part", "messages": [{"role": "user", "content": [{"type": "image", "image": "x\x00.png"}, {"type": "text", "text": "q"}]},
                                              {"role": "assistant", "content": "a"}]}
    path = write_json(data_dir / "nul.json", recs)
    stage = load_config(recipe(tmp_path, str(path))).train.stages["sft"]
    with pytest.raises(DataError, match=r"record 'nul': 'image' holds a path with a NUL byte"):
        check_stage_data("sft", stage, "error")
    data = check_stage_data("sft", stage, "skip", 0.2)
    assert [b.record_id for b in data.mixture.sources[0].bad] == ["nul", "nul-part"]
    assert "an image reference holds a path with a NUL byte" in data.mixture.sources[0].bad[1].message
    _, (res,) = train(tmp_path, str(path), max_skip_fraction=0.2)
    assert [rid for rid, _ in res.skipped] == ["nul", "nul-part"]


def test_nul_byte_in_a_preference_image_path_is_named(data_dir):
    from vlmkit.data.preference import read_preference_file

    path = write_json(data_dir / "pref-nul.json", [{"id": "p", "images": ["a\x00.png"], "prompt": "q", "chosen": "a", "rejected": "b"}])
    (item,) = read_preference_file(path)
    assert isinstance(item, BadRecordError) and "record 'p': an image path holds a path with a NUL byte" in str(item)


# ---- WebDataset shards -------------------------------------------------------------------------

def _shard(path: Path, data_dir: Path, n: int = 8, extra: list[tuple[str, bytes]] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        members = []
        for i, r in enumerate(records(data_dir, n)):
            record = {k: v for k, v in r.items() if k != "image"}
            members += [(f"k{i:03d}.json", json.dumps(record).encode()), (f"k{i:03d}.png", (data_dir / r["image"]).read_bytes())]
        for name, data in [*members, *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_cut_at_a_member_boundary_is_reported(data_dir, tmp_path):
    """Cut at a header boundary, tarfile ends its walk quietly: 6 of 8 records were indexed, nothing said."""
    whole = _shard(tmp_path / "whole.tar", data_dir)
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("k006.json").offset  # the header of record 7 of 8
    shard = tmp_path / "cut.tar"
    shard.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(DataError, match=r"cut\.tar: truncated: ends at byte \d+ without the tar end-of-archive marker; "
                                        r"the records after it are lost"):
        train(tmp_path, str(shard), on_bad_record="error")
    source = open_source(shard)
    assert len(source) == 5 and source.bad[-1].record_id == "cut.tar"
    assert [b.record_id for b in source.bad] == ["k005", "cut.tar"]  # the last record before the cut may be incomplete
    data = check_stage_data("sft", load_config(recipe(tmp_path, str(shard))).train.stages["sft"], "skip", 0.5)
    assert data.unusable == 2 and data.records == 7
    # Garbage where the next header should be is reported the same way.
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(whole.read_bytes()[:cut_at] + b"\x01" * 1024 + b"\0" * 4096)
    assert "garbled.tar: corrupt tar shard: no valid member header at byte" in open_source(garbled).bad[-1].message


def test_huge_tar_member_is_refused_from_its_header_without_reading_it(data_dir, tmp_path):
    """A 2 GB member was read whole into memory before it was refused. The shard here is sparse."""
    shard = _shard(tmp_path / "big.tar", data_dir, n=2)
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        tar.getmembers()
        end = tar.offset  # where the end-of-archive marker starts
    info = tarfile.TarInfo("k009.png")
    info.size = 2 << 30
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    record = tarfile.TarInfo("k009.json")
    body = json.dumps({"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}).encode()
    record.size = len(body)
    head = data[:end] + record.tobuf(format=tarfile.GNU_FORMAT) + body + b"\0" * (-len(body) % 512) + header
    with open(shard, "wb") as f:
        f.write(head)
        f.truncate(len(head) + info.size + 1024)  # the member's bytes and the end marker: zeros, never written
    source = open_source(shard)
    assert len(source) == 2
    (bad,) = source.bad
    assert bad.record_id == "k009" and f"big.tar: record 'k009': member 'k009.png' is {2 << 30} bytes, more than the {256 << 20} allowed" in bad.message


def test_tar_json_member_over_the_record_limit_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 100)
    source = open_source(_shard(tmp_path / "long.tar", data_dir, n=3), allow_empty=True)
    assert len(source) == 0 and all("more than the 100 allowed" in b.message for b in source.bad) and len(source.bad) == 3


def test_duplicate_key_in_a_shard_is_refused_naming_shard_and_key(data_dir, tmp_path):
    """A second KEY.json silently replaced the first."""
    other = json.dumps({"conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "other"}]}).encode()
    shard = _shard(tmp_path / "dup.tar", data_dir, extra=[("k002.json", other)])
    with pytest.raises(DataError, match=r"dup\.tar: record 'k002': two k002\.json members"):
        train(tmp_path, str(shard), on_bad_record="error")
    source = open_source(shard)
    assert len(source) == 7 and [b.record_id for b in source.bad] == ["k002"]


def test_train_command_on_a_stage_of_unusable_records_is_one_error_line(tmp_path):
    """Through the CLI: records that only encoding can refuse (an assistant turn first), skip mode,
    every skip allowed; the run stops with one `error:` line, saves no trained stage."""
    from typer.testing import CliRunner

    from vlmkit.cli import app

    bad = {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "y"}]}
    data = write_json(tmp_path / "data.json", [{"id": f"r{i}", **bad} for i in range(8)])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({
        "model": tiny_config("mlp").model_dump(mode="json"),
        "train": {"output_dir": str(tmp_path / "run"), "on_bad_record": "skip", "max_skip_fraction": 1.0, "feature_cache": False,
                  "stages": {"s": {"data": str(data), "trainable": ["connector"], "lr": 1e-3, "batch_size": 4, "max_steps": 2}}},
    }))
    result = CliRunner().invoke(app, ["train", str(recipe_file)])
    assert result.exit_code == 2, result.output
    assert f"error: stage 's': none of the 8 record(s) of {data} is usable, e.g. {data}: record 'r" in result.output
    assert "starts with an assistant turn" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints" / "s" / "meta.json").exists()
