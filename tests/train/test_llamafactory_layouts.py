"""LLaMA-Factory datasets as their `dataset_info.json` entry describes them: renamed columns and
role tags are read through the entry pasted into the recipe (`llamafactory:`), and ranking
records (sharegpt and alpaca) become the same preference pairs as the TRL format. A record that
does not follow its entry is refused naming the record and the tag it lacks."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tests._tiny import tiny_config
from vlmkit.cli import app
from vlmkit.config import LlamaFactoryEntry
from vlmkit.core.types import Message
from vlmkit.data.formats import read_llava_records
from vlmkit.data.preference import PreferencePair, read_preference_file
from vlmkit.data.sources import DataSourceError, open_source
from vlmkit.utils import read_jsonl

# LLaMA-Factory's own example of a renamed layout (its data/README.md, "sharegpt" with OpenAI
# roles): the turns are `messages` of role/content.
OPENAI_STYLE = {"formatting": "sharegpt", "columns": {"messages": "dialog", "images": "pictures", "system": "sys"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                         "system_tag": "system"}}


def renamed(rid="r"):
    return {"id": rid, "sys": "Be brief.", "pictures": ["a.png"], "dialog": [
        {"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}]}


def default_layout(rid="r"):
    return {"id": rid, "system": "Be brief.", "images": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "Red."}]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_renamed_columns_and_tags_read_as_the_default_layout(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    source = open_source(write(tmp_path / "renamed.jsonl", [renamed()]), llamafactory=LlamaFactoryEntry(**OPENAI_STYLE))
    expected = read_llava_records(write(tmp_path / "default.jsonl", [default_layout()]))[0]
    assert source.record(0) == expected
    assert expected.messages == [Message("system", "Be brief."), Message("user", "<image>What colour?"), Message("assistant", "Red.")]


def test_a_renamed_alpaca_dataset(tmp_path):
    entry = LlamaFactoryEntry(formatting="alpaca", columns={"prompt": "question", "response": "answer", "images": "pics"})
    record = {"id": "a", "question": "<image>Name the shape.", "answer": "Circle.", "pics": ["a.png"]}
    sample = open_source(write(tmp_path / "d.jsonl", [record]), llamafactory=entry, check_files=False).record(0)
    assert sample.messages == [Message("user", "<image>Name the shape."), Message("assistant", "Circle.")]
    assert sample.images == [tmp_path / "a.png"]


def test_a_turn_that_does_not_follow_the_entry_is_named(tmp_path):
    bad = renamed("bad")
    bad["dialog"][1] = {"from": "gpt", "value": "Red."}  # the default tags, not the entry's
    odd = renamed("odd")
    odd["dialog"][0]["role"] = "human"
    source = open_source(write(tmp_path / "d.jsonl", [renamed("ok"), bad, odd]), llamafactory=LlamaFactoryEntry(**OPENAI_STYLE),
                         check_files=False, allow_empty=True)
    assert len(source) == 1
    messages = [b.message for b in source.bad]
    assert "record 'bad': dialog[1]" not in messages[0]  # named by the default key it was renamed to
    assert "record 'bad': conversations[1] needs 'role' and 'content'" in messages[0]
    assert "record 'odd': conversations[0] has speaker 'human', which is none of the entry's tags" in messages[1]


def test_an_entry_that_names_no_such_column_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [renamed()])
    with pytest.raises(DataSourceError, match=r"\['prompt'\] are not sharegpt columns"):
        open_source(path, llamafactory=LlamaFactoryEntry(columns={"prompt": "q"}))
    with pytest.raises(DataSourceError, match="ranking: true, but the stage's loss is sft"):
        open_source(path, llamafactory=LlamaFactoryEntry(ranking=True))


def test_sharegpt_and_alpaca_ranking_records_are_the_trl_pair(tmp_path):
    trl = {"id": "p", "images": ["a.png"], "prompt": [{"role": "user", "content": "<image>What colour?"}],
           "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue."}]}
    sharegpt = {"id": "p", "images": ["a.png"], "conversations": [{"from": "human", "value": "<image>What colour?"}],
                "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Blue."}}
    alpaca = {"id": "p", "images": ["a.png"], "instruction": "What colour?", "chosen": "Red.", "rejected": "Blue."}
    pairs = read_preference_file(write(tmp_path / "p.jsonl", [trl, sharegpt, alpaca]))
    assert all(isinstance(p, PreferencePair) for p in pairs), pairs
    # alpaca leaves the image implicit: it goes first, on its own line, as LLaMA-Factory places it.
    assert pairs[2].prompt == [Message("user", "<image>\nWhat colour?")]
    for p in pairs[:2]:
        assert (p.prompt, p.chosen, p.rejected, p.images) == (pairs[0].prompt, "Red.", "Blue.", [tmp_path / "a.png"])


def test_a_ranking_side_spoken_by_the_user_is_refused(tmp_path):
    record = {"id": "u", "conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "human", "value": "x"},
              "rejected": {"from": "gpt", "value": "y"}}
    [bad] = read_preference_file(write(tmp_path / "p.jsonl", [record]))
    assert "record 'u'" in str(bad) and "'chosen' must be an assistant turn" in str(bad)


def test_recipe_check_and_train_read_a_renamed_dataset_through_its_entry(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 12), (200, 0, 0)).save(tmp_path / "a.png")
    write(tmp_path / "d.jsonl", [renamed("one"), renamed("two")])
    source = {"path": "d.jsonl", "llamafactory": OPENAI_STYLE}
    recipe = {"model": tiny_config("mlp").model_dump(mode="json", exclude_none=True),
              "train": {"output_dir": str(tmp_path / "run"), "stages": {"sft": {"data": [source], "trainable": ["connector"],
                                                                                 "lr": 1e-3, "max_steps": 1,
                                                                                 "batch_size": 2}}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["recipe", "--check", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    assert "2 records" in result.output
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("stage") == "sft" and "loss" in r]
    # Both records were read as conversations with a supervised answer ("Red." and its end).
    assert len(steps) == 1 and steps[0]["supervised_tokens"] > 0 and steps[0]["images"] == 2
    assert (tmp_path / "run" / "checkpoints" / "sft" / "config.json").is_file()
    source["llamafactory"] = {**OPENAI_STYLE, "tags": {}}  # the default tags: every turn is refused by name
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["recipe", "--check", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2 and "record 'one': conversations[0] needs 'from' and 'value'" in result.output
